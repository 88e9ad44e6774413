"""Markdown report and PNG plots of ``paper_comparison.py`` results (one JSON row per job)."""

from __future__ import annotations

import datetime
from collections import defaultdict
from pathlib import Path

import numpy as np

from arenaseg.config import ADAPTER_METHODS as ADAPTERS
from arenaseg.backbones import EMBEDDED_BACKBONE
from paper_comparison import COMPARED, STRUCTURES


def ms(values) -> str:
    """``mean ± sd`` (sample standard deviation; ``mean`` alone for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _select(rows, **conditions):
    return [r for r in rows if all(r[k] == v for k, v in conditions.items())]


def _seed_means(rows, structures, key="dice"):
    """Per seed, the mean over ``structures`` of ``key`` (so ± is the spread over seeds)."""
    by_seed = defaultdict(list)
    for r in rows:
        if r["structure"] in structures and r.get(key) is not None:
            by_seed[r["seed"]].append(r[key])
    return [np.mean(v) for s, v in sorted(by_seed.items()) if len(v) == len(structures)]


BOOTSTRAP = 10_000


def bootstrap_spread_difference(per_r0: dict, seed: int = 0):
    """Percentile bootstrap over seeds of (ARENA's − LoRA's) max − min spread of mean Dice across r0.

    ``per_r0[method][r0]`` is the list of per-seed Dice means. Returns (2.5 %, 97.5 % quantiles,
    fraction of resamples where ARENA's spread is smaller), or None with fewer than 2 seeds per cell.
    """
    cells = [np.asarray(v, float) for m in ("lora", "arena") for v in per_r0[m].values()]
    if any(len(c) < 2 for c in cells):
        return None
    rng = np.random.default_rng(seed)

    def spreads(method):
        means = np.stack([rng.choice(np.asarray(v, float), (BOOTSTRAP, len(v))).mean(axis=1)
                          for v in per_r0[method].values()])
        return means.max(axis=0) - means.min(axis=0)
    diff = spreads("arena") - spreads("lora")
    return float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975)), float(np.mean(diff < 0))


def lambda_table(header, rows, rank_rows, p, default_lam: float) -> list[str]:
    """Markdown lines: ARENA's Dice and discovered rank against r0 at every λ of the ablation."""
    ablation = [r for r in rows if r["protocol"] == "lambda"]
    if not ablation:
        return []
    lams = sorted({default_lam} | {r["lam"] for r in ablation})
    run = header["lambda_ablation"]
    lines = [f"ARENA at other λ (the rank sweep again, {len(p['rank_seeds'])} seeds; "
             f"`{run['command']}`, revision {run['revision']}, {run['wall_s'] / 60:.1f} min): "
             "mean Dice, discovered rank of all 9 layers.", "",
             "| r0 | " + " | ".join(f"λ = {lam:g}" for lam in lams) + " |", "|---|" + "---|" * len(lams)]
    spread = {}
    for r0 in p["ranks"]:
        cells = []
        for lam in lams:
            sel = (_select(rank_rows, method="arena", rank=r0) if lam == default_lam
                   else _select(ablation, lam=lam, rank=r0))
            means = _seed_means(sel, p["rank_structures"])
            spread.setdefault(lam, []).append(np.mean(means) if means else np.nan)
            found = [sum(r["ranks"].values()) for r in sel]
            cells.append(f"{ms(means)}, rank {np.mean(found):.0f} of {9 * r0}" if found else "—")
        lines.append(f"| {r0} | " + " | ".join(cells) + " |")
    lines += ["| spread (max − min) | " + " | ".join(
        f"{np.nanmax(spread[lam]) - np.nanmin(spread[lam]):.3f}" for lam in lams) + " |", ""]
    best = min(lams, key=lambda lam: np.nanmax(spread[lam]) - np.nanmin(spread[lam]))
    top = max(lams, key=lambda lam: np.nanmean(spread[lam]))
    lines += [f"A larger λ switches off more components, so the discovered rank grows less with r0; "
              f"the smallest spread across r0 is at λ = {best:g} and the highest mean Dice over r0 "
              f"at λ = {top:g} (60 steps).", ""]
    return lines


def plot_ranks(rows, path: Path) -> None:
    """Bar chart: ARENA's discovered rank per layer (k = 3, r0 = 8), mean over seeds, one bar
    group per structure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arena = _select(rows, protocol="in-scan", method="arena", k=3, rank=8)
    names = [n for n in STRUCTURES if any(r["structure"] == n for r in arena)]
    layers = list(arena[0]["ranks"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        means = [np.mean([r["ranks"][layer] for r in arena if r["structure"] == name]) for layer in layers]
        ax.bar(np.arange(len(layers)) + i * width, means, width, label=name)
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2)
    ax.set_xticklabels([f"L{i + 1}" for i in range(len(layers))])
    ax.set_xlabel("adapted convolution (L1 = first encoder layer … L9 = last decoder layer)")
    ax.set_ylabel("discovered rank (of r0 = 8)")
    ax.set_title("ARENA: effective rank per layer, k = 3, mean over seeds")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rank_steps(rows, path: Path) -> None:
    """Total effective rank against training step: ARENA for every r0 (mean over structures and
    seeds), AdaLoRA at r0 = 8 for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def curve(method, r0):
        runs = [np.asarray(r["total_rank"], float) / sum(r["initial_ranks"].values()) for r in rows
                if r["method"] == method and r["rank"] == r0 and r["k"] == 3 and r["protocol"] in ("in-scan", "rank")]
        return np.mean(runs, axis=0) if runs else None
    for r0 in sorted({r["rank"] for r in rows if r["method"] == "arena"}):
        c = curve("arena", r0)
        if c is not None:
            ax.plot(np.arange(1, len(c) + 1), c, label=f"ARENA r0 = {r0}")
    c = curve("adalora", 8)
    if c is not None:
        ax.plot(np.arange(1, len(c) + 1), c, "k--", label="AdaLoRA r0 = 8")
    ax.set_xlabel("training step")
    ax.set_ylabel("effective rank / allocated rank (all layers)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Rank against training step (k = 3, mean over structures and seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, header: dict, rows: list[dict]) -> None:
    """Write ``out`` (Markdown) and its PNGs beside it."""
    out = Path(out)
    from arenaseg.training import AdaptSettings

    # the settings the run used (older runs stored the loop budget only: today's defaults)
    p, budget = header["protocol"], header.get("settings") or AdaptSettings(**header["budget"]).to_dict()
    methods = [m for m in COMPARED if any(r["method"] == m for r in rows)]
    base = [n for n in p["structures"] if STRUCTURES[n][1]]
    new = [n for n in p["structures"] if not STRUCTURES[n][1]]
    trained = [m for m in methods if m != "zero-shot"]
    seeds = p["seeds"]
    planned = [r for r in rows if r["protocol"] != "lambda"]
    kind = (" (QUICK smoke run)" if header["quick"] else
            f" (rank sweep: {' and '.join(p['methods'])} only, the engine's default steps)" if "methods" in p else "")
    lines = [f"# Paper comparison: few-slice adaptation of the embedded backbone{kind}", "",
             f"- Date: {datetime.date.today()}; git revision {header['revision']}",
             f"- Machine: {header['machine']}; CPU only, {header['workers']} worker processes "
             "× 1 thread",
             f"- Command: `{header['command']}`; {len(planned)} of {header['jobs']} planned jobs "
             "done" + ("" if len(planned) == header["jobs"] else " (**run cut short: tables "
                       "below are partial**)") + "; " +
             (f"total wall time {header['wall_s'] / 60:.1f} min" if "wall_s" in header else
              "no total wall time (cut short)") +
             f"; worker time {sum(r['train_s'] + r['predict_s'] for r in planned) / 60 / header['workers']:.1f} min "
             "(sum of the jobs' training and segmentation seconds / workers; excludes process "
             "start, cross-scan segmentation and the memory runs)",
             *[f"- Added later (`--add-method`): {', '.join(a['methods'])}, {a['jobs']} jobs at revision "
               f"{a['revision']}" for a in header.get("added", [])],
             "- Data: `abdomen_ct` (122×101×112, 3 mm) and `abdomen_ct_dicom` (512×512×20, another "
             "patient); references are TotalSegmentator labels. Painted slices: k axial slices "
             "spread evenly inside the structure, taken from the reference; Dice on every "
             "unpainted slice (in-scan) or on the whole other scan (cross-scan).",
             f"- Same for every method: backbone `{EMBEDDED_BACKBONE}`, painted voxels, crops "
             f"(96×96×{budget['slab']} voxels around painted voxels, {budget['crops_per_step']} per "
             f"step), loss (Dice + CE at the painted voxels), {budget['steps']} AdamW steps, seeds "
             f"{list(seeds)} (rank robustness: {list(p.get('rank_seeds', seeds))}), post-processing (region connected to the paint). η = 5e-3 (full "
             "fine-tuning 5e-4); adapters on the 9 encoder/decoder convolutions, r0 = 8 unless "
             f"stated; ARENA λ = {budget['lam']:g}, ρ = {budget['rho']:g}; AdaLoRA (PEFT): target rank "
             "r0/2 per layer on average, tinit 10 %, tfinal 20 % of the steps, orthogonality "
             "weight 0.5; LoRA (PEFT): scaling 1.",
             "- `fill`: Slicer's *Fill between slices* (ITK's morphological contour "
             "interpolation, `bench/fill_between_slices.py`) from the same painted slices: no "
             "training, the same result for every seed; nothing beyond the first and last painted slice.",
             "- Structures the backbone was pretrained on (liver, spleen, aorta, stomach) start "
             "from its own output row; its pretraining used this very scan, so their numbers are "
             "optimistic. The new structures are the real few-shot test.",
             "- Mean ± standard deviation over seeds everywhere (per-seed means over structures "
             "for the aggregate rows).", ""]

    def table(title, row_names, cell, first="structure"):
        lines.extend([f"## {title}", "", f"| {first} | " + " | ".join(methods) + " |",
                      "|---|" + "---|" * len(methods)])
        for name in row_names:
            lines.append(f"| {name} | " + " | ".join(cell(name, m) for m in methods) + " |")
        lines.append("")

    main = [r for r in rows if r["protocol"] == "in-scan" and r["k"] == 3 and r["rank"] == 8]
    cell = lambda n, m: ms([r["dice"] for r in _select(main, structure=n, method=m)])  # noqa: E731
    groups = {"mean, base": base, "mean, new": new, "mean, all": list(p["structures"])}
    table("Dice on unpainted slices, k = 3 (in-scan, `abdomen_ct`)", list(p["structures"]) + list(groups),
          lambda n, m: cell(n, m) if n in STRUCTURES else
          ms(_seed_means(_select(main, method=m), groups[n])) if m != "zero-shot" or n == "mean, base" else "—")
    means = {m: np.mean(_seed_means(_select(main, method=m), new + base)) for m in trained}

    if len(p["ks"]) > 1:
        ks_rows = [r for r in rows if r["protocol"] == "in-scan" and r["rank"] == 8]
        lines += [f"## Dice against the number of painted slices k (mean over {', '.join(p['k_structures'])})", "",
                  "| k | " + " | ".join(trained) + " |", "|---|" + "---|" * len(trained)]
        for k in p["ks"]:
            lines.append(f"| {k} | " + " | ".join(
                ms(_seed_means(_select(ks_rows, method=m, k=k), p["k_structures"])) for m in trained) + " |")
        lines.append("")

    cross = [r for r in rows if r.get("cross_dice") is not None]
    transfer = [m for m in methods if m != "fill"]  # Fill between slices needs paint on the target
    if cross:
        lines += ["## Cross-scan transfer: adapter saved on one scan, applied to the other", "",
                  "Dice of the whole other scan (k = 3 painted slices on the source scan; no paint on the target).", "",
                  "| organ, source → target | " + " | ".join(transfer) + " |", "|---|" + "---|" * len(transfer)]
        for src, dst in (("abdomen_ct", "abdomen_ct_dicom"), ("abdomen_ct_dicom", "abdomen_ct")):
            for name in p["cross"]:
                lines.append(f"| {name}, {src} → {dst} | " + " | ".join(
                    ms([r["cross_dice"] for r in cross if r["scan"] == src and r["structure"] == name
                        and r["method"] == m]) for m in transfer) + " |")
        lines.append("")

    rank_rows = [r for r in rows if r["method"] in ("lora", "arena") and r["k"] == 3
                 and r["protocol"] in ("in-scan", "rank") and r["structure"] in p["rank_structures"]]
    spreads = {}
    if rank_rows:
        lines += [f"## Rank robustness: initial rank r0 (k = 3; mean over {', '.join(p['rank_structures'])})", "",
                  "| r0 | LoRA Dice | ARENA Dice | ARENA discovered rank, sum of 9 layers (over structures and seeds) |",
                  "|---|---|---|---|"]
        per_r0 = {m: {} for m in ("lora", "arena")}
        for r0 in p["ranks"]:
            for m in per_r0:
                per_r0[m][r0] = _seed_means(_select(rank_rows, method=m, rank=r0), p["rank_structures"])
            found = [sum(r["ranks"].values()) for r in _select(rank_rows, method="arena", rank=r0)]
            found_text = (f"{np.mean(found):.1f} ± {np.std(found, ddof=1):.1f}" if len(found) > 1
                          else f"{found[0]}" if found else "—")
            lines.append(f"| {r0} | {ms(per_r0['lora'][r0])} | {ms(per_r0['arena'][r0])} | "
                         f"{found_text} of {9 * r0} |")
        for m in per_r0:
            mean_dice = [np.mean(v) for v in per_r0[m].values() if v]
            spreads[m] = (max(mean_dice) - min(mean_dice), float(np.std(mean_dice)))
        lines += ["", f"ARENA's discovered rank per structure (mean over {len(p['rank_seeds'])} seeds) and its "
                  "ratio to the rank at r0 = 8:", "",
                  "| r0 | " + " | ".join(p["rank_structures"]) + " |", "|---|" + "---|" * len(p["rank_structures"])]
        found = {(n, r0): np.mean([sum(r["ranks"].values()) for r in _select(rank_rows, method="arena", rank=r0, structure=n)] or [np.nan])
                 for n in p["rank_structures"] for r0 in p["ranks"]}
        for r0 in p["ranks"]:
            lines.append(f"| {r0} | " + " | ".join(
                f"{found[n, r0]:.1f} (× {found[n, r0] / found[n, 8]:.2f})" if 8 in p["ranks"] else f"{found[n, r0]:.1f}"
                for n in p["rank_structures"]) + " |")
        ratios = {n: found[n, max(p["ranks"])] / found[n, 8] for n in p["rank_structures"]} if 8 in p["ranks"] else {}
        lines += ["", "| spread of mean Dice across r0 | LoRA | ARENA |", "|---|---|---|",
                  f"| max − min | {spreads['lora'][0]:.3f} | {spreads['arena'][0]:.3f} |",
                  f"| standard deviation | {spreads['lora'][1]:.3f} | {spreads['arena'][1]:.3f} |", ""]
        boot = bootstrap_spread_difference(per_r0)
        if boot is not None:
            low, high, p_smaller = boot
            lines += [f"How much of this is seed noise: resampling the seeds of every (method, r0) "
                      f"cell with replacement ({BOOTSTRAP} times), ARENA's max − min spread minus "
                      f"LoRA's has a 95 % interval of [{low:+.3f}, {high:+.3f}]; ARENA's spread is the "
                      f"smaller one in {100 * p_smaller:.0f} % of the resamples.", ""]
        lines += lambda_table(header, rows, rank_rows, p, budget["lam"])

    long = _select(rows, protocol="steps")
    steps_change = {}
    if long:
        lines += [f"## Is the rank settled? The same runs with twice the steps (r0 = 8, k = 3, seeds {list(seeds)})", "",
                  f"| structure | rank, {budget['steps']} steps | rank, {2 * budget['steps']} steps | change | "
                  f"Dice, {budget['steps']} steps | Dice, {2 * budget['steps']} steps |", "|---|---|---|---|---|---|"]
        for n in sorted({r["structure"] for r in long}, key=list(STRUCTURES).index):
            short = _select(main, method="arena", structure=n)
            twice = _select(long, structure=n)
            r1 = np.mean([sum(r["ranks"].values()) for r in short])
            r2 = np.mean([sum(r["ranks"].values()) for r in twice])
            steps_change[n] = (r2 - r1) / r1
            lines.append(f"| {n} | {r1:.1f} | {r2:.1f} | {100 * steps_change[n]:+.0f} % | "
                         f"{ms([r['dice'] for r in short])} | {ms([r['dice'] for r in twice])} |")
        lines.append("")

    arena_main = _select(main, method="arena")
    if arena_main and new:
        layers = list(arena_main[0]["ranks"])
        lines += [f"## ARENA's rank per layer (r0 = 8, k = 3, mean over seeds)", "",
                  "| layer | " + " | ".join(p["structures"]) + " |", "|---|" + "---|" * len(p["structures"])]
        for i, layer in enumerate(layers):
            lines.append(f"| L{i + 1} `{layer.replace('features.model.', '')}` | " + " | ".join(
                f"{np.mean([r['ranks'][layer] for r in _select(arena_main, structure=n)]):.1f}"
                for n in p["structures"]) + " |")
        lines.append("")

    lines += ["## Cost per method", "",
              "Trainable and active parameters at r0 = 8 (active: ARENA's switched-off components and "
              "AdaLoRA's masked triplets not counted; the head's 17 included); seconds per job in "
              "the benchmark workers (training, then segmentation of the whole scan; k = 3); peak "
              "resident memory of one real `arenaseg adapt` process per method (liver, k = 3, "
              "the engine's defaults at the run's revision, 2 threads, but "
              f"{header.get('memory_steps', 3)} steps, since every step holds the same tensors; "
              f"{len(header.get('memory', {}))} processes, {header['workers']} at a time, "
              f"{header.get('memory_wall_s', float('nan')) / 60:.1f} min).", "",
              "| method | trainable | active | train s | segment s | `arenaseg adapt` peak MB |",
              "|---|---|---|---|---|---|"]
    memory = header.get("memory", {})
    for m in methods:
        sel = _select(main, method=m)
        mem = memory.get(m, {})
        lines.append(f"| {m} | {int(np.mean([r['trainable'] for r in sel])):,} | "
                     f"{int(np.mean([r['active'] for r in sel])):,} | "
                     f"{np.mean([r['train_s'] for r in sel]):.1f} | {np.mean([r['predict_s'] for r in sel]):.1f} | "
                     + (f"{mem['peak_mb']:.0f} |" if mem else "— |"))
    lines.append("")

    if any(r["method"] == "arena" for r in main):
        plot_ranks(rows, out.with_name(out.stem + "_ranks_per_layer.png"))
        plot_rank_steps(rows, out.with_name(out.stem + "_rank_vs_step.png"))
        layers = next(r["ranks"] for r in main if r["method"] == "arena")
        lines += ["## ARENA's discovered ranks", "",
                  "Layers: " + "; ".join(f"L{i + 1} = `{name.replace('features.model.', '')}`"
                                         for i, name in enumerate(layers)) + ".", "",
                  f"![rank per layer]({out.stem}_ranks_per_layer.png)", "",
                  f"![rank against step]({out.stem}_rank_vs_step.png)", ""]

    lines += ["## What the numbers say", ""]
    if "arena" in means:
        others = {m: v for m, v in means.items() if m != "arena"}
        best = max(others, key=others.get) if others else None
        ok = not others or means["arena"] >= max(others.values())
        lines.append(f"- {'MET' if ok else 'NOT MET'}: ARENA's mean Dice (k = 3, all structures) "
                     f"≥ every other method's: ARENA {means['arena']:.3f}" +
                     (f"; best other: {best} {others[best]:.3f}" if best else "") + ".")
    if spreads:
        ok = spreads["arena"][0] <= spreads["lora"][0] / 2
        lines.append(f"- {'MET' if ok else 'NOT MET'}: ARENA's Dice spread across r0 is at most half "
                     f"of LoRA's: {spreads['arena'][0]:.3f} vs {spreads['lora'][0]:.3f} (max − min).")
        boot = bootstrap_spread_difference(per_r0)
        if boot is not None:
            lines.append(f"- {'MET' if boot[1] < 0 else 'NOT MET'}: the bootstrap interval of ARENA's "
                         f"spread minus LoRA's lies below zero: [{boot[0]:+.3f}, {boot[1]:+.3f}].")
        below = [r0 for r0 in p["ranks"] if np.mean(per_r0["arena"][r0]) < np.mean(per_r0["lora"][r0])]
        lines.append(f"- {'MET' if not below else 'NOT MET'}: ARENA's mean Dice ≥ LoRA's at every r0"
                     + (f" (below at r0 = {', '.join(map(str, below))})." if below else "."))
    for n, ratio in (ratios.items() if rank_rows else ()):
        lines.append(f"- {'MET' if ratio <= 1.5 else 'NOT MET'}: {n}: rank at r0 = {max(p['ranks'])} "
                     f"is {ratio:.2f}× the one at r0 = 8 (target ≤ 1.5).")
    for n, change in steps_change.items():
        lines.append(f"- {'MET' if abs(change) <= 0.25 else 'NOT MET'}: {n}: doubling the steps "
                     f"changes the rank by {100 * change:+.0f} % (target within ± 25 %).")
    out.write_text("\n".join(lines) + "\n")
