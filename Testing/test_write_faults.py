"""A write that fails never looks like success (issue 11, section 1).

A full disk or a read-only output folder gives exit status 2, one line naming the file, the cause
and the fix, and leaves no output (nor temporary) file, for every output: the segmentation in
each format, the adapter and the pretrained weights with their model card; from the command line
and from the worker. A read-only folder is refused before any work.

The faults are real: a full disk is a small tmpfs filled up (when this user may mount one) or a
file-size limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored so writes fail with EFBIG as on a
full disk instead of killing the process); a read-only folder is a read-only mount for root,
whom permissions do not stop (or an immutable folder, ``chattr +i``, where root may not mount),
and a ``chmod 555`` folder otherwise.
"""

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from arenaseg.pipeline import adapt
from arenaseg.training import AdaptSettings

from conftest import ABDOMEN_SMALL, LIVER

CT = str(ABDOMEN_SMALL / "ct.nii.gz")
PAGE = 4096


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def run(argv, file_size=None, timeout=300):
    """``arenaseg ARGV`` in its own process (optionally under a file-size limit)."""
    return subprocess.run([sys.executable, "-m", "arenaseg", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout,
                          preexec_fn=_file_size_limit(file_size) if file_size else None)


def run_worker(job, folder, file_size=None, timeout=300):
    """The worker on ``job``; returns (exit status, events)."""
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "arenaseg.worker", str(path)], capture_output=True,
                          text=True, timeout=timeout,
                          preexec_fn=_file_size_limit(file_size) if file_size else None)
    path.unlink()
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def error_line(done) -> str:
    """The one error line of a finished command (phase lines may come before it)."""
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("arenaseg: error: "), done.stderr[-2000:]
    assert done.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in done.stderr
    return errors[0]


def assert_only(folder, *names):
    """Nothing else in ``folder``: no output, no temporary file or folder."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def _mount(folder, options) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def _unmount(folder):
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """``fill(free_pages)``: a 1 MiB tmpfs filled up to ``free_pages`` free pages, or skip where
    this user cannot mount one (the file-size-limit tests cover full disks there)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not _mount(folder, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def fill(free_pages):
        with open(folder / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\1" * PAGE)
                    f.flush()
            except OSError:  # the disk is full
                pass
        os.truncate(folder / "filler", (os.stat(folder / "filler").st_size // PAGE - free_pages) * PAGE)
        assert os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize == free_pages * PAGE
        return folder

    yield fill
    _unmount(folder)


@pytest.fixture
def read_only(tmp_path):
    """A folder this user cannot write in: a read-only mount for root (a 555 folder does not
    stop root), else a folder without write permission."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = _mount(folder, "ro,size=64k")
    immutable = False
    if not mounted:
        folder.chmod(0o555)
        if os.geteuid() == 0:  # root without mount rights (a container): an immutable folder
            immutable = subprocess.run(["chattr", "+i", str(folder)],
                                       capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        pytest.skip("no way to make a read-only folder for this user here")
    yield folder
    if mounted:
        _unmount(folder)
    else:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def adapter(small_liver, tmp_path_factory):
    """An adapter and its size, made with the settings the adapt tests use."""
    folder = tmp_path_factory.mktemp("faults")
    adapt(CT, str(small_liver[0]), LIVER, str(folder / "seg.nii.gz"), str(folder / "a.safetensors"),
          settings=AdaptSettings(steps=2), structure="liver", device="cpu")
    return folder / "a.safetensors"


def _adapt_argv(small_liver, out, adapter_out):
    return ["adapt", "--image", CT, "--annotations", small_liver[0], "--label", LIVER,
            "--structure", "liver", "--steps", "2", "--device", "cpu", "--out", out,
            "--adapter-out", adapter_out]


def _adapt_job(small_liver, out, adapter_out):
    return {"command": "adapt", "image": CT, "annotations": str(small_liver[0]), "label": LIVER,
            "out": str(out), "adapter_out": str(adapter_out), "structure": "liver",
            "device": "cpu", "settings": {"steps": 2}}


# --- full disk ------------------------------------------------------------------------------

FORMATS = (".nii", ".nii.gz", ".nrrd", ".mha", ".nhdr", ".mhd")  # the last two: header + data file

# Every kind of output through the one shared writer, in a process of its own (no model, so it
# is quick) where a file-size limit can be set.
WRITE_ALL = """
import json, sys
import SimpleITK as sitk
import torch
from arenaseg.errors import ArenaError
from arenaseg.io.images import write_image
from arenaseg.io.outputs import write_safetensors, write_text

folder, labels = sys.argv[1], sys.argv[2]
segmentation = sitk.Cast(sitk.ReadImage(labels) == 5, sitk.sitkUInt8) * 5
writes = {name: (lambda name=name: write_image(segmentation, f"{folder}/seg{name}",
                                               what="output segmentation", option="--out"))
          for name in sys.argv[3].split(",")}
writes[".safetensors"] = lambda: write_safetensors(
    f"{folder}/a.safetensors", {"w": torch.arange(4096.0)}, {"k": "v"}, "adapter output",
    "--adapter-out")
writes[".md"] = lambda: write_text(f"{folder}/card.md", "Dice × 0.9 " * 300, "model card", "--out")
for name, write in writes.items():
    try:
        write()
        print(json.dumps({name: "written"}))
    except ArenaError as err:
        print(json.dumps({name: str(err)}))
"""


def write_everything(folder, file_size=None):
    done = subprocess.run([sys.executable, "-c", WRITE_ALL, str(folder),
                           str(ABDOMEN_SMALL / "labels.nii.gz"), ",".join(FORMATS)],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(file_size) if file_size else None)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR" not in done.stderr  # what SimpleITK printed is folded into the one line
    return {k: v for line in done.stdout.splitlines() for k, v in json.loads(line).items()}


def test_every_output_past_the_file_size_limit_is_an_error_and_leaves_nothing(tmp_path):
    results = write_everything(tmp_path, file_size=1000)
    names = {".safetensors": "adapter output 'a.safetensors'", ".md": "model card 'card.md'"}
    assert sorted(results) == sorted(FORMATS + (".safetensors", ".md"))
    for suffix, message in results.items():
        what, name = names.get(suffix, f"output segmentation 'seg{suffix}'").split(" '")
        assert message.startswith(f"{what} '{tmp_path / name[:-1]}' could not be written "
                                  "(file too large)"), message
        assert "raise the file-size limit" in message and "\n" not in message
    assert_only(tmp_path)


def test_every_output_on_a_full_disk_is_an_error_and_leaves_nothing(small_disk):
    disk = small_disk(free_pages=0)
    results = write_everything(disk)
    assert len(results) == len(FORMATS) + 2
    for suffix, message in results.items():
        assert "could not be written (no space left on device)" in message, message
        assert "free space on that disk" in message
    assert_only(disk, "filler")


def test_every_output_written_normally_reads_back(tmp_path):
    assert set(write_everything(tmp_path).values()) == {"written"}
    assert_only(tmp_path, *(f"seg{s}" for s in FORMATS), "seg.raw.gz", "seg.zraw",
                "a.safetensors", "card.md")
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN_SMALL / "labels.nii.gz"))) == 5
    for suffix in FORMATS:  # a separate data file is published under the name its header gives
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"seg{suffix}")))
        assert np.array_equal(back == 5, liver)


def test_segment_past_the_file_size_limit_exits_2_and_writes_nothing(adapter, tmp_path):
    # SimpleITK's NIfTI writer returned normally after a short write here: the truncated file
    # opened as an image, most of the structure missing, and the command said "wrote".
    out = tmp_path / "seg.nii.gz"
    line = error_line(run(["segment", "--image", CT, "--adapter", adapter, "--out", out,
                           "--device", "cpu"], file_size=1000))
    assert f"'{out}'" in line and "file too large" in line and "--out" in line
    assert_only(tmp_path)


def test_a_full_disk_is_refused_before_any_work(small_liver, small_disk, tmp_path):
    disk = small_disk(free_pages=0)
    done = run(_adapt_argv(small_liver, disk / "seg.nii.gz", tmp_path / "a.safetensors"))
    line = error_line(done)
    assert f"'{disk / 'seg.nii.gz'}' cannot be written (no space left on device" in line
    assert "training" not in done.stderr
    assert_only(disk, "filler")
    assert_only(tmp_path, "disk")


def test_adapt_publishes_no_adapter_when_the_segmentation_fails(adapter, small_liver, tmp_path):
    # The adapter fits under the limit, the uncompressed segmentation (370 kB) does not: the
    # adapter, already written and verified, must not be published alone.
    limit = adapter.stat().st_size + 4 * PAGE
    assert limit < 370_000, "the adapter grew: choose a larger segmentation format here"
    out, adapter_out = tmp_path / "seg.nii", tmp_path / "liver.safetensors"
    line = error_line(run(_adapt_argv(small_liver, out, adapter_out), file_size=limit))
    assert f"output segmentation '{out}'" in line and "file too large" in line
    assert_only(tmp_path)


def test_worker_segment_on_a_full_disk_is_an_error_event(adapter, tmp_path):
    out = tmp_path / "seg.mha"
    rc, events = run_worker({"command": "segment", "image": CT, "adapter": str(adapter),
                             "out": str(out), "device": "cpu"}, tmp_path, file_size=1000)
    assert rc == 2 and events[-1]["event"] == "error" and "traceback" not in events[-1]
    message = events[-1]["message"]
    assert f"'{out}'" in message and "file too large" in message and "\n" not in message
    assert "done" not in [e["event"] for e in events]
    assert_only(tmp_path)


def test_pretrain_past_the_file_size_limit_writes_neither_weights_nor_card(tmp_path):
    out = tmp_path / "base.safetensors"
    line = error_line(run(["pretrain", "--scan", CT, ABDOMEN_SMALL / "labels.nii.gz",
                           "--classes", "spleen=1,liver=5", "--steps", "1", "--device", "cpu",
                           "--out", out], file_size=100_000))
    assert f"weights '{out}'" in line and "file too large" in line
    assert_only(tmp_path)


# --- read-only folder -----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["out", "adapter_out"])
def test_read_only_output_folder_is_refused_before_training(small_liver, read_only, tmp_path,
                                                            which):
    paths = {"out": tmp_path / "seg.nrrd", "adapter_out": tmp_path / "a.safetensors"}
    paths[which] = read_only / paths[which].name
    done = run(_adapt_argv(small_liver, paths["out"], paths["adapter_out"]))
    line = error_line(done)
    assert f"'{paths[which]}'" in line and "cannot be written" in line
    assert "writable" in line and ("--adapter-out" if which == "adapter_out" else "--out") in line
    assert "training" not in done.stderr
    # The worker says the same, before any training step.
    rc, events = run_worker(_adapt_job(small_liver, paths["out"], paths["adapter_out"]), tmp_path)
    assert rc == 2 and events[-1] == {"event": "error", "message": line[len("arenaseg: error: "):]}
    assert not [e for e in events if e["event"] == "progress"
                or e.get("phase") in ("training", "inference", "writing")]
    assert_only(read_only)
    assert_only(tmp_path, "read-only")


def test_segment_into_a_read_only_folder_is_refused(adapter, read_only):
    out = read_only / "seg.nii"
    line = error_line(run(["segment", "--image", CT, "--adapter", adapter, "--out", out]))
    assert f"'{out}'" in line and "cannot be written" in line
    assert_only(read_only)


def test_pretrain_into_a_read_only_folder_is_refused_before_training(read_only):
    out = read_only / "base.safetensors"
    done = run(["pretrain", "--scan", CT, ABDOMEN_SMALL / "labels.nii.gz", "--steps", "2",
                "--out", out])
    line = error_line(done)
    assert f"weights '{out}'" in line and "cannot be written" in line
    assert "pretrain:" not in done.stderr  # no training step was taken
    assert_only(read_only)
