"""Faults of the command line and the worker from public bug reports (issue 21, cases 5, 6, 8).

- 5: paths that are not UTF-8 (a Latin-1 folder ``b"M\\xfcller"``, SimpleITK#1255, ITK#4388,
  SimpleITK#795): SimpleITK aborts the whole process on them; every input (image, DICOM folder,
  adapter) and output (segmentation, adapter) there now works, through ASCII aliases, and leaves
  no alias, no temporary folder behind.
- 6: numbers out of range (numpy#4676): every numeric setting is checked before any work, with
  one line naming the option (``--seed``) or the job field (``settings.seed``), the value and the
  allowed range.
- 8: SIGTERM while the outputs are being written (nnU-Net#2513) stops like Ctrl-C: one line,
  exit status 143, no output and no temporary folder left.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arenaseg.cli import main
from arenaseg import config
from arenaseg.config import AdaptSettings, job_from_dict
from arenaseg.errors import ArenaError

from conftest import ABDOMEN_SMALL, DICOM, LIVER, signal_in_a_finalizer

CT = ABDOMEN_SMALL / "ct.nii.gz"
LATIN1 = b"M\xfcller"  # "Müller" in Latin-1: not UTF-8


def _env(tmp_path):
    """The environment of a child: its own temporary folder, to see that no alias stays there."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def arenaseg(argv, tmp_path, timeout=300):
    return subprocess.run([sys.executable, "-m", "arenaseg", *argv], capture_output=True,
                          timeout=timeout, env=_env(tmp_path))


def latin1_folder(tmp_path) -> str:
    """A folder named with Latin-1 bytes (created with bytes paths), as Python's str."""
    folder = os.fsencode(tmp_path) + b"/" + LATIN1
    os.mkdir(folder)
    return os.fsdecode(folder)


def error_line(done) -> str:
    err = done.stderr.decode("utf-8")
    assert done.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("arenaseg: error: ")
    return lines[-1]


def no_temporaries(folder: Path):
    assert not [p for p in Path(folder).iterdir() if p.name.startswith(".")], list(Path(folder).iterdir())


# --- 5: paths that are not UTF-8 ---------------------------------------------------------------

def test_image_outputs_and_adapter_in_a_latin1_folder_work(small_liver, tmp_path):
    folder = latin1_folder(tmp_path)
    image = os.path.join(folder, "ct.nii.gz")
    os.symlink(CT, image)
    out, adapter = os.path.join(folder, "seg.nii.gz"), os.path.join(folder, "a.safetensors")
    done = arenaseg(["adapt", "--image", image, "--annotations", str(small_liver[0]), "--label",
                     str(LIVER), "--out", out, "--adapter-out", adapter, "--steps", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert b"wrote " + os.fsencode(tmp_path) + b"/M\\xfcller/seg.nii.gz" in done.stdout
    assert os.path.isfile(out) and os.path.isfile(adapter)
    # the adapter reads back (it was once called corrupt), and a segment writes there too
    again = os.path.join(folder, "again.nrrd")
    done = arenaseg(["segment", "--image", image, "--adapter", adapter, "--out", again], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert b"corrupt" not in done.stderr and os.path.isfile(again)
    assert sorted(os.listdir(folder)) == ["a.safetensors", "again.nrrd", "ct.nii.gz", "seg.nii.gz"]
    assert os.listdir(tmp_path / "tmp") == []  # no alias left


def test_a_missing_image_in_a_latin1_folder_is_named_as_given(small_liver, tmp_path):
    folder = latin1_folder(tmp_path)
    done = arenaseg(["adapt", "--image", os.path.join(folder, "none.nii.gz"), "--annotations",
                     str(small_liver[0]), "--label", "5", "--out", os.path.join(folder, "s.nii.gz")],
                    tmp_path)
    line = error_line(done)
    assert "M\\xfcller/none.nii.gz' does not exist" in line and "arenaseg-inputs" not in line
    assert os.listdir(folder) == [] and os.listdir(tmp_path / "tmp") == []


def test_dicom_folder_in_a_latin1_folder_with_latin1_file_names_is_read(tmp_path):
    folder = latin1_folder(tmp_path)
    dicom = os.fsencode(folder) + b"/dicom"
    os.mkdir(dicom)
    for i, f in enumerate(sorted((DICOM / "dicom").iterdir())):
        os.symlink(os.fsencode(f), dicom + (b"/" + LATIN1 + b"%d" % i if i < 3 else b"/" + f.name.encode()))
    # paint that lies elsewhere in the world: refused after the series was read (no abort)
    done = arenaseg(["adapt", "--image", os.fsdecode(dicom), "--annotations",
                     str(ABDOMEN_SMALL / "labels.nii.gz"), "--label", "5",
                     "--out", str(tmp_path / "s.nii.gz")], tmp_path)
    line = error_line(done)
    assert "do not overlap the image" in line
    assert b"M\\xfcller/dicom: DICOM series" in done.stderr or b"read dicom: DICOM series" in done.stderr
    assert b"(20 slices)" in done.stderr and os.listdir(tmp_path / "tmp") == []


def test_readable_paths_alias_only_what_the_libraries_cannot_open(tmp_path):
    from arenaseg.io.outputs import ReadablePaths

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.nii.gz").write_bytes(b"x")
    odd = os.fsencode(tmp_path) + b"/" + LATIN1
    os.mkdir(odd)
    os.symlink(os.fsencode(plain / "a.nii.gz"), os.fsencode(plain) + b"/" + LATIN1 + b".dcm")
    with ReadablePaths() as paths:
        assert paths(str(plain / "a.nii.gz")) == str(plain / "a.nii.gz") and paths(None) is None
        mirror = paths(str(plain))  # a UTF-8 folder holding a Latin-1 file name
        assert sorted(os.listdir(mirror)) == ["M_ller.dcm", "a.nii.gz"]
        alias = paths(os.fsdecode(odd + b"/ct.nrrd"))
        alias.encode("ascii")
        assert paths.explain(f"'{alias}' is missing") == f"'{tmp_path}/M\\xfcller/ct.nrrd' is missing"
        folder = paths.folder
    assert not os.path.exists(folder) and (plain / "a.nii.gz").is_file()


def test_worker_reads_and_writes_in_a_latin1_folder(small_liver, tmp_path):
    folder = latin1_folder(tmp_path)
    image = os.path.join(folder, "ct.nii.gz")
    os.symlink(CT, image)
    job = {"command": "adapt", "image": image, "annotations": str(small_liver[0]), "label": LIVER,
           "out": os.path.join(folder, "w.nii.gz"), "adapter_out": os.path.join(folder, "w.safetensors"),
           "settings": {"steps": 2}}
    (tmp_path / "job.json").write_text(json.dumps(job))  # JSON escapes the bytes: "\udcfc"
    done = subprocess.run([sys.executable, "-m", "arenaseg.worker", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and events[-1]["event"] == "done", done.stdout[-2000:] + done.stderr[-2000:]
    assert events[-1]["segmentation"] == job["out"] and events[-1]["adapter"] == job["adapter_out"]
    assert sorted(os.listdir(folder)) == ["ct.nii.gz", "w.nii.gz", "w.safetensors"]
    assert os.listdir(tmp_path / "tmp") == []


# --- 6: numbers out of range -------------------------------------------------------------------

@pytest.mark.parametrize("option, value, words", [
    ("--seed", str(2**64), f"--seed {2**64} must be >= 0 and <= {2**32 - 1}"),
    ("--seed", "-1", "--seed -1 must be >= 0"),
    ("--rank", "100000000", "--rank 100000000 must be >= 1 and <= 1024"),
    ("--steps", str(10**12), "--steps 1000000000000 must be >= 1 and <= 100000"),
    ("--lr", "5", "--lr 5.0 must be > 0 and <= 1"),
    ("--lambda", "1e300", "--lambda 1e+300 must be >= 0 and <= 1000000"),
    ("--rho", "inf", "--rho inf must be a finite number"),
])
def test_cli_numbers_out_of_range_are_refused_before_any_work(small_liver, tmp_path, capsys,
                                                              option, value, words):
    out = tmp_path / "s.nii.gz"
    rc = main(["adapt", "--image", str(CT), "--annotations", str(small_liver[0]), "--label", "5",
               "--out", str(out), option, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("arenaseg: error: "), err
    assert words in err[0]  # the option, the value, the range; no "reading" line before it
    assert list(tmp_path.iterdir()) == []


def test_pretrain_and_demo_numbers_out_of_range_are_refused(tmp_path, capsys):
    assert main(["pretrain", "--scan", str(CT), str(ABDOMEN_SMALL / "labels.nii.gz"), "--out",
                 str(tmp_path / "w.safetensors"), "--seed", str(2**64)]) == 2
    assert f"--seed {2**64} must be >= 0 and <= {2**32 - 1}" in capsys.readouterr().err
    assert main(["demo", "--data", str(ABDOMEN_SMALL), "--out-dir", str(tmp_path / "d"),
                 "--seed", str(2**32)]) == 2
    assert "--seed 4294967296 must be" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("settings, words", [
    ({"seed": 2**64}, f"job field settings.seed {2**64} must be >= 0 and <= {2**32 - 1}"),
    ({"rank": 100000000}, "job field settings.rank 100000000 must be >= 1 and <= 1024"),
    ({"max_points": 0}, "settings.max_points 0 must be >= 1"),
    ({"crops_per_step": 10**6}, "settings.crops_per_step 1000000 must be >= 1 and <= 64"),
    ({"interpolate_mm": -3}, "settings.interpolate_mm -3 must be >= 0"),
])
def test_job_numbers_out_of_range_name_the_field(settings, words):
    with pytest.raises(ArenaError) as err:
        job_from_dict({"command": "adapt", "image": "ct.nii.gz", "out": "s.nii.gz",
                       "annotations": "p.nii.gz", "label": 5, "settings": settings})
    assert words in str(err.value) and "--" not in str(err.value)


def test_job_slice_axis_out_of_range_names_the_field():
    with pytest.raises(ArenaError, match="job field slice_axis is 7: give 0, 1 or 2"):
        job_from_dict({"command": "adapt", "image": "ct.nii.gz", "out": "s.nii.gz",
                       "annotations": "p.nii.gz", "label": 5, "slice_axis": 7})


def test_worker_refuses_a_huge_rank_before_any_work(tmp_path):
    job = {"command": "adapt", "image": str(CT), "annotations": "p.nii.gz", "label": 5,
           "out": str(tmp_path / "s.nii.gz"), "settings": {"rank": 100000000, "seed": 2**64}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "arenaseg.worker", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 2 and [e["event"] for e in events] == ["error"], done.stdout
    assert "settings.rank 100000000" in events[0]["message"]
    assert "settings.seed 18446744073709551616" in events[0]["message"]
    assert "Traceback" not in done.stderr and sorted(os.listdir(tmp_path)) == ["job.json"]


def test_every_limit_admits_the_defaults_and_refuses_beyond():
    AdaptSettings()  # the defaults are within every range
    for name, (low, high) in config.LIMITS.items():
        beyond = high * 2 if name != "slab" else high + 16
        with pytest.raises(ArenaError, match=f"{name.replace('_', '-') if name != 'lam' else 'lambda'} "):
            AdaptSettings(**{name: beyond})
    with pytest.raises(ArenaError, match="--rank 8.5 must be a whole number"):
        AdaptSettings(rank=8.5)


# --- 8: SIGTERM while writing ------------------------------------------------------------------

@pytest.mark.parametrize("signum, status, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                   (signal.SIGHUP, 129, "hung up (SIGHUP)")])
def test_sigterm_while_writing_leaves_nothing_and_says_so(small_liver, tmp_path, signum, status, said):
    """SIGTERM as soon as the hidden temporary folder of an output appears: exit 143, one line,
    nothing left (before: killed silently, the temporary folder and a partial file stayed).
    SIGHUP (the terminal closed, the SSH session dropped) is handled alike: exit 129 (before, the
    hidden folder holding the whole adapter stayed)."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    # the temporary folders live for about 30 ms (writing, flushing, reading back both files):
    # polling the folder without pause sees them
    proc = subprocess.Popen([sys.executable, "-m", "arenaseg", "adapt", "--image", str(CT),
                             "--annotations", str(small_liver[0]), "--label", "5",
                             "--out", str(outdir / "seg.nii.gz"),
                             "--adapter-out", str(outdir / "a.safetensors"),
                             "--steps", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path))
    deadline = time.monotonic() + 240
    seen = False
    while proc.poll() is None and time.monotonic() < deadline:
        if any(e.is_dir() and e.name.startswith(".") for e in os.scandir(outdir)):
            seen = True
            break
    assert seen, proc.communicate()[1][-3000:]
    for _ in range(20):  # a second signal may not cut the clean-up short either
        proc.send_signal(signum)
        time.sleep(0.005)
    _, err = proc.communicate(timeout=30)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == status, err[-3000:]
    assert lines[-1].startswith(f"arenaseg: {said}; ")
    assert "Traceback" not in err.decode()
    if lines[-1].endswith("no output was written"):
        assert list(outdir.iterdir()) == []
    else:  # the signal came as the outputs were renamed into place: all of them are there
        assert sorted(p.name for p in outdir.iterdir()) == ["a.safetensors", "seg.nii.gz"]
    assert os.listdir(tmp_path / "tmp") == []


def test_ctrl_c_raised_inside_a_finalizer_still_ends_the_run(monkeypatch, capsys, tmp_path):
    """Ctrl-C whose KeyboardInterrupt the handler raised inside a finalizer (a tester's case:
    tqdm's ``__del__`` ran as the outputs were written), where Python reports it as 'Exception
    ignored' and drops it: the run still ends with exit 130 and its one line (it went on and
    exited 0), and Python's report is not printed."""
    from arenaseg import cli

    def command(args):
        signal_in_a_finalizer(signal.SIGINT)
        print("finished")

    monkeypatch.setattr(cli, "cmd_segment", command)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, *cli.ENDING)}
    try:
        status = cli.main(["segment", "--image", str(CT), "--adapter", str(tmp_path / "a.safetensors"),
                           "--out", str(tmp_path / "seg.nii.gz")])
        assert signal.getsignal(signal.SIGINT) == handlers[signal.SIGINT]
    finally:  # an interrupted main ignores SIGTERM from then on (its process ends): not pytest's
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    out, err = capsys.readouterr()
    assert "finished" in out  # the command ran to its end: the interrupt came inside it
    assert status == 130
    assert err.strip().splitlines()[-1] == "arenaseg: interrupted; no output was written"
    assert "Exception ignored" not in err and "Traceback" not in err
