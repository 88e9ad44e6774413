"""Fetch a large file once into the cache: resumable, with a progress bar, checked, atomic.

A download goes to ``<file>.part`` next to its final place in the cache (``$ARENASEG_CACHE`` or
``~/.cache/arenaseg``, as for ``arenaseg demo``); an interrupted one resumes from there with an
HTTP ``Range`` request. The finished file is checked (size, SHA-256 or MD5 when published) and only
then renamed into place (``os.replace``), so the cache never holds a partial or wrong file under
the final name. When no hash is published, the SHA-256 the user got is recorded in
``<file>.sha256`` and checked on every later use, so a file that changes later is noticed.

Users behind a firewall download the file by hand (browser, another machine) and put it at the
path the error message names, or pass it as a local file: nothing is fetched then.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .errors import ArenaError

CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where downloads are kept: ``$ARENASEG_CACHE``, else ``~/.cache/arenaseg``."""
    return Path(os.environ.get("ARENASEG_CACHE") or Path.home() / ".cache" / "arenaseg")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``hashlib`` algorithm name), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_checksum(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of the sorted per-file hashes of a folder (a DICOM series)."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("".join(file_digest(p) for p in files).encode()).hexdigest()


def recorded_sha256(path: Path) -> Path:
    """Where the SHA-256 a user got for an unpublished-hash file is recorded."""
    return path.with_name(path.name + ".sha256")


def _by_hand(urls, dest: Path) -> str:
    return (f"download it by hand from {urls[0]} and put it at '{dest}' (or pass the file "
            "with --weights FILE)")


def verify(path: Path, sha256: str | None = None, md5: str | None = None,
           size: int | None = None, source: str | None = None) -> str:
    """Check a file against its published size and hash; return its SHA-256.

    Without a published SHA-256, a hash recorded at the first download (``<file>.sha256``) is
    checked instead.

    Raises:
        ArenaError: size or hash differ (the message names the file, both values and the fix).
    """
    where = f" (from {source})" if source else ""
    if size is not None and path.stat().st_size != size:
        raise ArenaError(f"'{path}'{where} has {path.stat().st_size} bytes, expected {size}: "
                         "the download is incomplete or the file changed; delete it and fetch again")
    got = file_digest(path)
    record = recorded_sha256(path)
    expected = sha256 or (record.read_text().split()[0] if record.is_file() else None)
    if expected is not None and got != expected.lower():
        raise ArenaError(f"'{path}'{where} has SHA-256 {got}, expected {expected}: "
                         "the file is corrupt or was replaced; delete it and fetch again")
    if md5 is not None and file_digest(path, "md5") != md5.lower():
        raise ArenaError(f"'{path}'{where} has MD5 {file_digest(path, 'md5')}, expected {md5}: "
                         "the file is corrupt or was replaced; delete it and fetch again")
    return got


def fetch(urls: str | tuple[str, ...] | list[str], dest: str | os.PathLike, *,
          sha256: str | None = None, md5: str | None = None, size: int | None = None,
          progress: bool | Callable[[int, int | None], None] = True,
          timeout: float = 60.0) -> Path:
    """Make sure ``dest`` holds the file published at ``urls`` (tried in order) and return it.

    An existing ``dest`` is verified and returned without network access. Otherwise the file is
    downloaded to ``dest + ".part"`` (resumed with ``Range: bytes=N-`` when a partial file is
    there and the server answers 206), with a ``tqdm`` progress bar on stderr, verified, and
    moved into place atomically. Without a published SHA-256 the hash obtained is written to
    ``dest + ".sha256"`` and printed, so that later uses are checked against it.

    Args:
        urls: one URL or several mirrors.
        dest: final path, normally under :func:`cache_dir`.
        sha256, md5: published hashes (hex), or None when unknown.
        size: published size in bytes, or None.
        progress: show the bar; a callable is also called after each chunk with the bytes
            downloaded so far and the total (None when unknown), e.g. to report to a GUI.

    Raises:
        ArenaError: unreachable server or HTTP error (the message names the URL and ``dest``,
            and says how to download by hand; the partial file is kept for resuming), an HTML
            page instead of the file, or a checksum/size mismatch (the partial file is deleted,
            nothing enters the cache).
    """
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    dest = Path(dest)
    if dest.is_file():
        verify(dest, sha256, md5, size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            _download(url, part, size, progress, timeout)
            break
        except (urllib.error.URLError, OSError, ValueError) as err:
            errors.append(f"{url}: {getattr(err, 'reason', None) or err}")
    else:
        raise ArenaError(f"could not download '{dest.name}' ({'; '.join(errors)}); "
                         + _by_hand(urls, dest))
    try:
        got = verify(part, sha256, md5, size, source=urls[0])
    except ArenaError as err:
        part.unlink(missing_ok=True)
        raise ArenaError(f"{str(err).split(': ')[0]}: the download is corrupt or the published "
                         f"file changed; it was deleted and nothing entered the cache. Try again, "
                         "or " + _by_hand(urls, dest)) from None
    os.replace(part, dest)
    if sha256 is None:
        recorded_sha256(dest).write_text(f"{got}  {dest.name}\n")
        print(f"arenaseg: no published SHA-256 for '{dest.name}'; recorded the one obtained "
              f"({got}) in '{recorded_sha256(dest)}'", file=sys.stderr, flush=True)
    return dest


def _download(url: str, part: Path, size: int | None, progress, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (resuming with a Range request when possible)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": "arenaseg"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and size is not None and have == size:
            return  # the partial file is already complete
        raise
    with response:
        if "text/html" in (response.headers.get("Content-Type") or ""):
            raise ValueError("the server sent a web page, not the file (a sign-in or "
                             "confirmation page)")
        if have and response.status != 206:
            have = 0  # the server ignored the Range request: start again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        with open(part, "ab" if have else "wb") as out, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=part.name[:-len(".part")], disable=not progress, file=sys.stderr) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))
                if callable(progress):
                    progress(bar.n, total)
    if length is not None and part.stat().st_size != total:
        raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")


__all__ = ["cache_dir", "fetch", "file_digest", "path_checksum", "verify", "recorded_sha256"]
