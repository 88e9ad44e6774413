"""The background worker: a real process printing JSON lines; SIGTERM stops it mid-run and leaves
no output (how fast: bench/CANCEL.md)."""

import json
import signal
import subprocess
import sys

from conftest import ABDOMEN_SMALL, LIVER, signal_in_a_finalizer


def start(job: dict, tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return subprocess.Popen([sys.executable, "-m", "arenaseg.worker", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def adapt_job(ann, tmp_path, steps):
    return {"command": "adapt", "image": str(ABDOMEN_SMALL / "ct.nii.gz"), "annotations": str(ann),
            "label": LIVER, "out": str(tmp_path / "seg.nii.gz"),
            "adapter_out": str(tmp_path / "liver.safetensors"), "structure": "liver",
            "device": "cpu", "settings": {"steps": steps}}


def test_worker_reports_progress_and_done(small_liver, tmp_path):
    proc = start(adapt_job(small_liver[0], tmp_path, steps=3), tmp_path)
    out, _ = proc.communicate(timeout=300)
    events = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 0
    kinds = [e["event"] for e in events if e["event"] not in ("phase", "warning")]
    assert kinds == ["started"] + ["progress"] * 3 + ["done"]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3]
    assert all(e["total_rank"] == sum(e["ranks"].values()) for e in progress)
    # every phase reports, in order; inference reports each window
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert [p for i, p in enumerate(phases) if p not in phases[:i]] == [
        "reading", "preprocessing", "training", "inference", "writing"]
    windows = [e for e in events if e["event"] == "phase" and "total" in e]
    assert windows and [e["done"] for e in windows] == list(range(1, windows[0]["total"] + 1))
    done = events[-1]
    assert done["objects"] >= 1 and done["volume_ml"] > 0 and done["removed_ml"] >= 0
    assert done["segmentation"] == str(tmp_path / "seg.nii.gz") and (tmp_path / "seg.nii.gz").is_file()
    assert done["adapter"] == str(tmp_path / "liver.safetensors")
    assert done["effective_rank"] == sum(done["ranks"].values())
    assert done["next_slice"] not in done["painted_slices"]  # where to paint next


def test_sigterm_stops_mid_run_and_leaves_nothing(small_liver, tmp_path):
    proc = start(adapt_job(small_liver[0], tmp_path, steps=1000), tmp_path)
    first = proc.stdout.readline()
    while json.loads(first)["event"] != "progress":
        first = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)  # 1000 steps would take many minutes
    rest = [json.loads(line) for line in proc.stdout.read().splitlines()]
    assert proc.returncode == 143 and rest[-1]["event"] == "cancelled"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_bad_input_is_an_error_event(tmp_path):
    proc = start({"command": "adapt", "image": str(tmp_path / "missing.nii.gz"),
                  "annotations": "x", "label": 1, "out": str(tmp_path / "s.nii.gz")}, tmp_path)
    out, _ = proc.communicate(timeout=120)
    last = json.loads(out.splitlines()[-1])
    assert proc.returncode == 2 and last["event"] == "error" and "missing.nii.gz" in last["message"]


def test_fields_of_the_wrong_type_are_named_before_any_work(small_liver, tmp_path):
    job = adapt_job(small_liver[0], tmp_path, steps=3)
    for broken, named in ((dict(job, settings={"steps": "10"}), 'settings.steps is "10" (a JSON string): give a whole number'),
                          (dict(job, label=[1]), "label is [1] (a JSON array)"),
                          (dict(job, image=5), "image is 5 (a JSON number): give a text"),
                          ([1, 2], "the job is a JSON array, not an object")):
        proc = start(broken, tmp_path)
        out, err = proc.communicate(timeout=120)
        events = [json.loads(line) for line in out.splitlines()]
        assert proc.returncode == 2, err
        assert [e["event"] for e in events] == ["error"]  # refused before "started"
        assert named in events[0]["message"] and "arenaseg/worker.py" in events[0]["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_sigterm_raised_inside_a_finalizer_still_cancels(monkeypatch, capsys, tmp_path):
    """SIGTERM whose Cancelled the handler raised inside a finalizer (tqdm's ``__del__`` as the
    outputs were written), where Python drops it: the job still ends 'cancelled', exit 143 (it
    reported 'done' and exit 0)."""
    from arenaseg import worker

    def run_job(job):
        signal_in_a_finalizer(signal.SIGTERM)
        return {"segmentation": job["out"]}

    monkeypatch.setattr(worker, "run_job", run_job)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(adapt_job(tmp_path / "paint.nii.gz", tmp_path, steps=3)))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        status = worker.main([str(path)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 143
    assert [e["event"] for e in events] == ["started", "cancelled"]
