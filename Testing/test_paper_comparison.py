"""The paper-comparison benchmark: its full plan covers the protocols, and its quick mode runs
end to end on the real scans and writes a consistent report with plots."""

import json
import re
import subprocess
import sys
from pathlib import Path

from arenaseg.config import AdapterSettings
from conftest import DATA

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_full_plan_covers_every_protocol_with_three_seeds():
    from paper_comparison import COMPARED, CROSS, FULL, plan

    jobs = plan(FULL)
    assert {j["k"] for j in jobs if j["protocol"] == "in-scan"} == {1, 3, 5}
    assert {j["rank"] for j in jobs} == {2, 4, 8, 16, 32}
    assert {j["method"] for j in jobs if j["rank"] != 8} == {"lora", "arena"}
    assert {j["method"] for j in jobs} == set(COMPARED)  # the engine's methods and Fill between slices
    assert {j["seed"] for j in jobs if j["method"] == "fill"} == {0}  # deterministic
    trained = [j for j in jobs if j["method"] not in ("zero-shot", "fill")]
    per_setting = {}
    for j in trained:
        # the rank sweep's extra seeds repeat r0 = 8 under protocol "rank": the same setting
        key = tuple(v for k, v in j.items() if k not in ("seed", "protocol"))
        per_setting.setdefault(key, set()).add(j["seed"])
    assert all(len(seeds) >= 3 for seeds in per_setting.values())
    assert {j["seed"] for j in jobs if j["protocol"] == "rank"} == set(FULL["rank_seeds"]) == set(range(3))
    new = {"urinary_bladder", "iliopsoas_left", "inferior_vena_cava"}
    assert {j["structure"] for j in jobs if j["protocol"] == "rank"} == new
    doubled = [j for j in jobs if j["protocol"] == "steps"]
    assert {(j["structure"], j["seed"], j["steps_factor"]) for j in doubled} == {
        (n, seed, 2) for n in new for seed in range(3)}
    forward = {j["structure"] for j in jobs if j["cross_to"] == "abdomen_ct_dicom"}
    reverse = {j["structure"] for j in jobs if j["cross_to"] == "abdomen_ct"}
    assert forward == reverse == set(CROSS) == {"liver", "spleen", "aorta", "stomach"}
    engine_six = {"liver", "spleen", "aorta", "urinary_bladder", "iliopsoas_left", "inferior_vena_cava"}
    assert engine_six <= {j["structure"] for j in jobs if j["k"] == 3 and j["protocol"] == "in-scan"}


def test_quick_run_writes_a_consistent_report(tmp_path):
    out = tmp_path / "quick.md"
    done = subprocess.run([sys.executable, str(BENCH / "paper_comparison.py"), "--quick",
                           "--data", str(DATA), "--out", str(out)],
                          capture_output=True, text=True, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    header, *rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == header["jobs"] > 0 and header["wall_s"] > 0
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    assert {r["method"] for r in rows} == {"zero-shot", "linear-probe", "bitfit", "affine-ln",
                                            "full", "lora", "adalora", "arena"}
    assert all(0 <= sum(r["ranks"].values()) <= sum(r["initial_ranks"].values()) for r in rows)
    assert {"linear-probe", "arena"} == set(header["memory"])
    assert all(m["peak_mb"] > 100 for m in header["memory"].values())

    report = out.read_text()
    for section in ("Dice on unpainted slices", "Cross-scan transfer", "Rank robustness",
                    "Cost per method", "What the numbers say"):
        assert f"## {section}" in report or section in report
    assert header["revision"] in report and "Machine:" in report
    liver_arena = next(r for r in rows if r["structure"] == "liver" and r["method"] == "arena"
                       and r["protocol"] == "in-scan")
    header_line = next(line for line in report.splitlines() if line.startswith("| structure |"))
    liver_line = next(line for line in report.splitlines() if line.startswith("| liver |"))
    column = [c.strip() for c in header_line.split("|")].index("arena")
    assert f"{liver_arena['dice']:.3f}" in liver_line.split("|")[column]
    assert re.search(r"- (MET|NOT MET): ARENA's mean Dice", report)
    for png in ("quick_ranks_per_layer.png", "quick_rank_vs_step.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    # the λ ablation adds ARENA's rank sweep at another λ to the same results and report
    done = subprocess.run([sys.executable, str(BENCH / "paper_comparison.py"), "--lambda-ablation", "8",
                           "--data", str(DATA), "--out", str(out)],
                          capture_output=True, text=True, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    header, *after = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert after[:len(rows)] == rows
    added = after[len(rows):]
    assert len(added) == header["lambda_ablation"]["jobs"] == 2  # quick: r0 ∈ {2, 8}, one structure
    assert {(r["method"], r["lam"], r["rank"]) for r in added} == {("arena", 8.0, 2), ("arena", 8.0, 8)}
    table = out.read_text().split("ARENA at other λ")[1]
    assert f"| λ = {AdapterSettings.lam:g} | λ = 8 |" in table and "spread (max − min)" in table
