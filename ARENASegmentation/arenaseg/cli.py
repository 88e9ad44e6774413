"""The arenaseg command line: adapt, segment, pretrain, demo.

Every user error prints one line ``arenaseg: error: ...`` (file, value, fix) and exits with 2.
Ctrl-C exits with 130, SIGTERM with 143 and SIGHUP (terminal closed) with 129, each after one
line; none leaves an output or a temporary file (:mod:`arenaseg.io.outputs`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from .errors import ArenaError
from .io.outputs import PUBLISHED, ReadablePaths, interrupt, interrupts_not_lost, shown

TOTALSEG_BASE_ORGANS = ("spleen=1,kidney_right=2,kidney_left=3,gallbladder=4,liver=5,stomach=6,"
                        "pancreas=7,duodenum=19,aorta=52")


def parse_classes(text: str) -> dict[str, int]:
    """``name=value,name=value`` → ordered dict of class name → label value."""
    try:
        pairs = [(name.strip(), int(value)) for name, value in
                 (item.split("=") for item in text.split(",") if item.strip())]
    except ValueError:
        raise ArenaError(f"--classes '{text}' is not of the form name=value,name=value") from None
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise ArenaError(f"--classes '{text}' names a class twice: give each class once")
    return dict(pairs)


def _check_range(option: str, value, low, high, note: str = "") -> None:
    """Refuse a numeric option outside [low, high] before any work (one line: option, value,
    range)."""
    if value is not None and not low <= value <= high:
        raise ArenaError(f"{option} {value} must be >= {low} and <= {high}{note}")


def cmd_pretrain(args) -> None:
    from .config import LIMITS
    from .inference import pick_device
    from .pretrain import pretrain

    _check_range("--seed", args.seed, *LIMITS["seed"], " (numpy's limit)")
    _check_range("--steps", args.steps, 1, 1_000_000)

    report = pretrain([tuple(s) for s in args.scan], parse_classes(args.classes), Path(args.out),
                      steps=args.steps, lr=args.lr, seed=args.seed, augment=args.augment,
                      device=pick_device(args.device),
                      init=Path(args.init) if args.init else None, command=args.command_line)
    print(f"wrote {shown(args.out)} and {shown(Path(args.out).with_suffix('.md'))} "
          f"({report['seconds']:.0f} s)")


def _progress_bar():
    """Update callback drawing a tqdm bar (step of steps, loss, total effective rank); the bar
    appears at the first step, so input errors print alone, and starts there, so its rate is
    that of the training steps, not of the set-up before them."""
    from tqdm import tqdm

    bar = None

    def update(step: int, steps: int, loss: float, ranks: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=steps, initial=step, desc="adapt", unit="step")
        else:
            bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", rank=sum(ranks.values()))
        if step == steps:
            bar.close()
    return update


NOT_KEPT = "that were not confident, or that the frozen backbone does not read as the painted structure"


def _objects(count: int, ml: float) -> str:
    return f"{count} object{'s' if count != 1 else ''} ({ml:.1f} mL)"


class PhaseLines:
    """``status`` callback of the pipeline: a line on stderr as each phase starts (stdout keeps
    the results), and a tqdm bar for a phase that reports ``done`` of ``total``, so no phase of
    a run is silent."""

    def __init__(self, explain=None):
        self.bar = None
        self.explain = explain or (lambda text: text)  # inputs' aliases → the paths given

    def __call__(self, phase: str, message: str, done: int | None = None,
                 total: int | None = None) -> None:
        from tqdm import tqdm

        if total is None:
            print(f"arenaseg: {shown(self.explain(message))}", file=sys.stderr, flush=True)
            return
        if phase == "downloading":  # the download draws its own bar
            return
        if self.bar is None or self.bar.total != total or done < self.bar.n:
            self.bar = tqdm(total=total, desc=phase, unit=message)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def print_ranks(ranks: dict[str, int], initial: dict[str, int] | int) -> None:
    """Per-layer discovered rank table."""
    width = max(map(len, ranks), default=5)
    print(f"{'layer':<{width}}  rank")
    for name, r in ranks.items():
        r0 = initial[name] if isinstance(initial, dict) else initial
        print(f"{name:<{width}}  {r:>2} / {r0}")


def _settings(args):
    from .config import AdaptSettings

    given = {"method": args.method, "rank": args.rank, "lam": args.lam, "lr": args.lr,
             "rho": args.rho, "steps": args.steps, "seed": args.seed,
             "self_training": args.self_training,
             "targets": tuple(args.targets) if args.targets else None,
             "train_decoder": args.train_decoder or None,
             "checkpointing": args.checkpointing or None}
    return AdaptSettings(**{k: v for k, v in given.items() if v is not None})


def _job(args):
    """The job the options describe (:mod:`arenaseg.config`; the options bear its field names)."""
    from dataclasses import fields

    from .config import JOBS, job_from_dict

    names = {f.name for f in fields(JOBS[args.command])} - {"settings"}
    given = {name: value for name, value in vars(args).items() if name in names}
    if args.command == "adapt":
        given["settings"] = _settings(args)
    return job_from_dict({"command": args.command, **given})


def _no_job_without_server(args) -> None:
    if getattr(args, "job", None) and not args.server:
        raise ArenaError(f"--job {args.job} needs --server URL: the server that runs the job")


def cmd_adapt(args) -> None:
    _no_job_without_server(args)
    if args.server:
        from .client import run_remote

        return run_remote(args)
    from .pipeline import adapt

    job = _job(args)
    settings = job.settings
    result = adapt(**job.arguments(), progress=_progress_bar(), status=PhaseLines(args.explain))
    report_adapt(args, result, settings)


def report_adapt(args, result, settings) -> None:
    """What an adapt did (``result``: an AdaptResult, or its fields from a server's ``done``)."""
    print(f"learned from {len(result.painted_slices)} painted slices across voxel axis "
          f"{'ijk'[result.slice_axis]}: {', '.join(map(str, result.painted_slices))}")
    print(f"result: {_objects(result.objects, result.volume_ml)} connected to the paint; removed "
          f"{_objects(result.removed_objects, result.removed_ml)} predicted away from it")
    if result.profile:
        print("the frozen backbone reads the painted structure as "
              + ", ".join(f"{name} {share:.0%}" for name, share in result.profile.items()))
    if result.ranks:
        print_ranks(result.ranks, settings.rank)
    if result.zero_shot_dice is not None:
        print(f"zero-shot Dice of the backbone's own {args.structure} on the painted slices: "
              f"{result.zero_shot_dice:.3f}")
    rank = f"effective rank {result.effective_rank} of {result.initial_rank}; " if result.ranks else ""
    print(f"{result.method}: {rank}parameters {result.active_parameters:,} active of "
          f"{result.trainable_parameters:,} trained; {result.seconds:.1f} s on {result.device}")
    print(f"wrote {shown(result.segmentation)}"
          + (f" and {shown(result.adapter)}" if result.adapter else ""))
    if args.suggest:
        print(f"paint slice {result.next_slice} (voxel axis {'ijk'[result.slice_axis]}) next: the "
              "result is least sure there" if result.next_slice is not None else
              "no slice to suggest: the result is sure on every unpainted slice near it")


def cmd_segment(args) -> None:
    _no_job_without_server(args)
    if args.server:
        from .client import run_remote

        return run_remote(args)
    from .pipeline import segment

    report_segment(args, segment(**_job(args).arguments(), status=PhaseLines(args.explain)))


def report_segment(args, result: dict) -> None:
    """What a segment did (``result``: the engine's dict, or a server's ``done`` event)."""
    if result["objects"] == 0:
        print(f"no confident object: the structure seems absent from {shown(args.explain(args.image))}; the "
              f"segmentation is empty (removed {_objects(result['removed_objects'], result['removed_ml'])} "
              f"{NOT_KEPT})")
    else:
        painted = result["painted_objects"]
        print(f"result: {_objects(result['objects'], result['volume_ml'])}"
              + (f" (the structure had {painted} where it was adapted)" if painted not in (None, result["objects"]) else "")
              + f"; removed {_objects(result['removed_objects'], result['removed_ml'])} {NOT_KEPT}")
    print(f"wrote {shown(result['segmentation'])} ({result['structure'] or 'label ' + str(result['label'])}, "
          f"effective rank {sum(result['ranks'].values())}, {result['seconds']:.1f} s)")


def cmd_demo(args) -> None:
    import numpy as np
    import SimpleITK as sitk

    from .io.annotations import dice, find_annotation, paint_slices
    from .demo import sample_data
    from .io.geometry import array_ijk, image_like
    from .io.images import read_image, write_image
    from .io.labels import read_labels_on
    from .pipeline import adapt

    _check_range("--slices", args.slices, 1, 1000)
    settings = _settings(args)  # every number checked before any work
    data = Path(args.data) if args.data else sample_data()
    image, labels = data / "ct.nii.gz", data / "labels.nii.gz"
    ct = read_image(image)
    reference = array_ijk(read_labels_on(ct, labels, "labels"))
    holding = int(np.any(reference == args.label, axis=(0, 1)).sum())
    if holding == 0:
        present = ", ".join(map(str, np.unique(reference)[1:21].tolist()))
        raise ArenaError(f"--label {args.label} is absent from {shown(args.explain(str(labels)))} "
                         f"(values present: {present}): give one of them")
    if args.slices >= holding:  # Dice is measured on the structure's unpainted slices
        raise ArenaError(f"--slices {args.slices}: label {args.label} lies on {holding} axial "
                         f"slices of {shown(args.explain(str(labels)))}; give at most "
                         f"{holding - 1}, so that some are left to measure the Dice on")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArenaError(f"--out-dir '{shown(out_dir)}' is a file: give a folder (it is created "
                         "when missing)")
    painted = paint_slices(reference, args.label, args.slices, axis=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations = write_image(image_like(painted, ct), out_dir / "painted_slices.nii.gz")
    print(f"painted {int(np.any(painted == args.label, axis=(0, 1)).sum())} axial slices of "
          f"label {args.label} ({args.structure}) from {shown(args.explain(str(labels)))}")
    result = adapt(str(image), str(annotations), args.label, str(out_dir / "segmentation.nii.gz"),
                   str(out_dir / "adapter.safetensors"), settings=settings,
                   structure=args.structure, device=args.device,
                   progress=_progress_bar(), status=PhaseLines(args.explain))
    print_ranks(result.ranks, settings.rank)
    with ReadablePaths() as paths:  # SimpleITK takes UTF-8 paths only
        seg = array_ijk(sitk.ReadImage(paths(result.segmentation, "--out-dir"))) > 0
    unpainted = ~find_annotation(painted, args.label, axis=2).known
    score = dice(seg, reference == args.label, unpainted)
    print(f"effective rank {result.effective_rank} of {result.initial_rank}; adapter parameters "
          f"{result.active_parameters:,} active of {result.trainable_parameters:,} trained; "
          f"{result.seconds:.1f} s on {result.device}")
    print(f"Dice on the {int(np.any(unpainted, axis=(0, 1)).sum())} unpainted slices: {score:.3f}")
    print(f"wrote {shown(out_dir)}/segmentation.nii.gz, adapter.safetensors, painted_slices.nii.gz")


def _add_adapt_options(p) -> None:
    from .config import DEFAULT_LR, DEFAULT_METHOD, FULL_FINE_TUNING_LR, METHODS, AdaptSettings

    d = AdaptSettings()
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="arena: rank found by the l1 gate (default); baselines: lora (fixed "
                        "rank, PEFT), adalora (PEFT), linear-probe (head), bitfit (biases), "
                        "affine-ln (norm scale/shift), full (all weights), zero-shot (the "
                        "backbone's own class, no training)")
    p.add_argument("--rank", type=int, default=None,
                   help=f"initial rank r0 of every adapter (default {d.rank}; with --warm-start, the adapter's)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help=f"l1 weight λ on the gates, higher: smaller rank (default {d.lam:g})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps on the paint (default {d.steps})")
    p.add_argument("--self-training", type=int, default=None, metavar="ROUNDS",
                   help="rounds of self-training after the steps, of half as many steps each: "
                        "the structure found so far on the unpainted slices trains too; helps "
                        "long structures at 3 slices, hurts others (bench/SELF_TRAINING.md; "
                        f"default {d.self_training}: the paint only)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"η: AdamW learning rate of A, B, head (default {DEFAULT_LR:g}; "
                        f"{FULL_FINE_TUNING_LR:g} with --method full)")
    p.add_argument("--rho", type=float, default=None,
                   help=f"ρ: the gates' step ρ·η, gradient normalised per layer (default {d.rho:g})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"random seed of crops and initialisation (default {d.seed})")
    p.add_argument("--targets", nargs="+", metavar="REGEX",
                   help="module-name patterns of the adapted layers (default: the backbone's)")
    p.add_argument("--train-decoder", action="store_true",
                   help="also train the backbone's decoder")
    p.add_argument("--checkpointing", action="store_true",
                   help="gradient checkpointing in the backbone (SwinUNETR): less GPU memory")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def _add_server_options(p) -> None:
    """--server and --token-file: run the job on an 'arenaseg serve' server (arenaseg/client.py)."""
    p.add_argument("--server", metavar="URL",
                   help="run on this arenaseg server (e.g. https://gpu.example.org:8443): upload "
                        "the inputs, follow the job, download the outputs to the same paths")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding your server token (default: environment ARENASEG_TOKEN)")
    p.add_argument("--job", metavar="ID",
                   help="with --server: follow job ID, queued earlier by this same command, and "
                        "fetch its outputs to --out (and --adapter-out) instead of submitting it "
                        "again (after the client was cut off: the job goes on on the server)")


def _add_image_options(p) -> None:
    """--image and --series, as adapt and segment read a scan."""
    p.add_argument("--image", required=True, help="CT: NIfTI, NRRD, MHA file or DICOM folder")
    p.add_argument("--series", metavar="UID",
                   help="SeriesInstanceUID to read when --image is a DICOM folder holding several "
                        "series (listed when needed)")


def _label(text: str) -> int | str:
    """A label value, or a segment name (resolved against the annotations file)."""
    return int(text) if text.strip().lstrip("+-").isdigit() else text


def _axis(text: str) -> int | None:
    if text == "auto":
        return None
    if text in ("0", "1", "2"):
        return int(text)
    raise argparse.ArgumentTypeError(f"'{text}' is not auto, 0, 1 or 2")


class _Parser(argparse.ArgumentParser):
    """Errors in one line, like the engine's own, pointing at ``--help`` instead of the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_BACKBONE

    parser = _Parser(prog="arenaseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the embedded backbone (arena-small-ct-unet) on labelled CT scans")
    p.add_argument("--scan", nargs=2, action="append", required=True, metavar=("IMAGE", "LABELS"),
                   help="a CT (file or DICOM folder) and its labelmap; repeat for more scans")
    p.add_argument("--classes", default=TOTALSEG_BASE_ORGANS,
                   help="output classes as name=label_value,... (default: the paper's base "
                        "organs with TotalSegmentator label values)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init", help="start from these weights (.safetensors) instead of scratch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random rotation, scaling, intensity, gamma, noise, smoothing and bias "
                        "field on each crop (for patients and contrast phases not trained on)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("adapt", help="adapt to a structure painted on a few slices, segment it in 3D")
    _add_image_options(p)
    p.add_argument("--annotations", required=True,
                   help="labelmap with a few painted slices (any grid overlapping the image)")
    p.add_argument("--label", type=_label, required=True,
                   help="label value of the structure, or its segment name in a 3D Slicer .seg.nrrd")
    p.add_argument("--out", required=True, help="segmentation to write (.nii.gz, .nrrd, .mha)")
    p.add_argument("--adapter-out", help="adapter to write (.safetensors)")
    p.add_argument("--structure", help="structure name stored in the adapter (e.g. liver)")
    p.add_argument("--slice-axis", type=_axis, default=None,
                   help="voxel axis of the painted slices: auto (default), 0, 1 or 2")
    p.add_argument("--background-label", type=int,
                   help="label value of voxels known not to be the structure (any slice)")
    p.add_argument("--warm-start", help="continue from this adapter file")
    p.add_argument("--suggest", action="store_true",
                   help="also say which slice to paint next: the one where the result is least sure")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="pretrained backbone: a registry id (see README, Backbones; public "
                        "checkpoints are downloaded once into the cache) or a checkpoint file "
                        f"(default {DEFAULT_BACKBONE})")
    p.add_argument("--weights", help="local checkpoint file of --backbone (no download)")
    _add_adapt_options(p)
    _add_server_options(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("segment", help="segment a scan with a saved adapter")
    _add_image_options(p)
    p.add_argument("--adapter", required=True, help="adapter file written by 'arenaseg adapt'")
    p.add_argument("--weights", help="local checkpoint file of the adapter's backbone (no download)")
    p.add_argument("--out", required=True, help="segmentation to write (.nii.gz, .nrrd, .mha)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    _add_server_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="paint 3 slices of a sample CT's labels, adapt, report Dice")
    p.add_argument("--data", help="folder with ct.nii.gz and labels.nii.gz (default: download "
                                  "the TotalSegmentator example CT once)")
    p.add_argument("--label", type=int, default=21, help="label value to paint (default 21)")
    p.add_argument("--structure", default="urinary_bladder", help="name of that structure")
    p.add_argument("--slices", type=int, default=3, help="number of axial slices to paint")
    p.add_argument("--out-dir", default="arenaseg-demo", help="where the results go")
    _add_adapt_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve jobs to several users over HTTP (needs the 'server' "
                                     "extra; README, Server)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs TLS)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--data", required=True, help="server folder: database, uploads, results")
    p.add_argument("--workers", type=int, default=1, help="jobs run at the same time (default 1)")
    p.add_argument("--max-upload-mb", type=float, default=1024,
                   help="largest upload accepted, in MB (default 1024)")
    p.add_argument("--rate-limit", default=None, metavar="RATE",
                   help="requests each user may send, e.g. 600/minute (the default) or 20/second;"
                        " beyond it: HTTP 429 with Retry-After")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="where jobs run: local (worker processes here, the default) or ray (Ray "
                        "tasks, one GPU each when the cluster has GPUs; needs the 'ray' extra)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --backend ray: the Ray cluster to use (e.g. auto or "
                        "ray://head:10001; default: start a local Ray instance)")
    p.add_argument("--max-job-file-mb", type=float, metavar="MB",
                   help="largest file one job may write (default: no limit); beyond it the job "
                        "fails with one line and publishes nothing")
    p.add_argument("--max-job-memory-gb", type=float, metavar="GB",
                   help="address space of one job's process (default: no limit); a job beyond "
                        "it is retried once with smaller crops")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM), needed beyond loopback")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="manage the server's user tokens")
    tokens = p.add_subparsers(dest="token_command", required=True)
    t = tokens.add_parser("add", help="create a token for a user (printed once, stored hashed)")
    t.add_argument("--data", required=True, help="the server folder of 'arenaseg serve --data'")
    t.add_argument("name", help="user name")
    t.set_defaults(func=cmd_token_add)

    p = sub.add_parser("audit", help="print the server's audit log: who ran what on which upload")
    p.add_argument("--data", required=True, help="the server folder of 'arenaseg serve --data'")
    p.add_argument("--user", help="only this user's rows")
    p.add_argument("--job", help="only this job's rows")
    p.set_defaults(func=cmd_audit)
    return parser


def cmd_serve(args) -> None:
    from .server import DEFAULT_RATE_LIMIT, serve

    serve(args.host, args.port, args.data, workers=args.workers,
          max_upload_mb=args.max_upload_mb, ssl_certfile=args.ssl_certfile,
          ssl_keyfile=args.ssl_keyfile, rate_limit=args.rate_limit or DEFAULT_RATE_LIMIT,
          max_job_file_mb=args.max_job_file_mb, max_job_memory_gb=args.max_job_memory_gb,
          backend=args.backend, ray_address=args.ray_address)


def cmd_token_add(args) -> None:
    from .jobstore import JobStore

    store = JobStore(args.data)
    try:
        token = store.add_token(args.name)
    finally:
        store.close()
    print(f"token for {args.name} (shown only this once; the server keeps its SHA-256): {token}")


def cmd_audit(args) -> None:
    """One line a row, oldest first: time (UTC), user, action, job, SHA-256s, client, detail
    (``-`` where there is none; tab-separated for ``cut`` and spreadsheets)."""
    from .jobstore import DATABASE, JobStore

    if not (Path(args.data) / DATABASE).is_file():
        raise ArenaError(f"--data '{args.data}' holds no {DATABASE}: give the folder of "
                         "'arenaseg serve --data'")
    store = JobStore(args.data)
    try:
        rows = store.audit_rows(args.user, args.job)
    finally:
        store.close()
    for row in rows:
        print("\t".join("-" if value is None else str(value) for value in row.values()))


#: Options that name files or folders the command reads (its outputs go through
#: :class:`~arenaseg.io.outputs.Outputs`): each is read through an ASCII alias when it is not
#: UTF-8 (:class:`~arenaseg.io.outputs.ReadablePaths`).
INPUT_OPTIONS = {"image": "--image", "annotations": "--annotations", "warm_start": "--warm-start",
                 "weights": "--weights", "backbone": "--backbone", "adapter": "--adapter",
                 "init": "--init", "data": "--data", "scan": "--scan"}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (the terminal closed, the SSH session dropped), handled as Ctrl-C is:
    the run stops, its temporary files are removed; exit status 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


#: Signals that end a run as Ctrl-C does, and how the last line names them.
ENDING = {signal.SIGTERM: "terminated (SIGTERM)"}
if hasattr(signal, "SIGHUP"):  # not on Windows
    ENDING[signal.SIGHUP] = "hung up (SIGHUP)"
_terminating: list[int] = []  # such a signal came: whatever error surfaces next is its doing


def _on_sigterm(signum, frame):
    for ending in ENDING:  # one is enough: a second cannot cut the clean-up
        signal.signal(ending, signal.SIG_IGN)
    _terminating.append(signum)
    interrupt(Terminated(signum))


def _on_sigint(signum, frame):
    interrupt(KeyboardInterrupt())  # as Python's own handler, but never inside signals_held


def _readable_inputs(args, paths: ReadablePaths) -> None:
    for name, option in INPUT_OPTIONS.items():
        value = getattr(args, name, None)
        if name == "scan" and value:
            setattr(args, name, [[paths(p, option) for p in pair] for pair in value])
        elif isinstance(value, str):
            setattr(args, name, paths(value, option))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.command_line = "arenaseg " + shlex.join(argv)
    try:
        previous = {ending: signal.signal(ending, _on_sigterm) for ending in ENDING}
        previous_int = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # main() called outside the main thread: signals stay as they are
        previous, previous_int = None, None
    paths = ReadablePaths()
    args.explain = paths.explain
    published = len(PUBLISHED)
    try:
        with interrupts_not_lost():
            _readable_inputs(args, paths)
            args.func(args)
    except ArenaError as err:
        print(f"arenaseg: error: {shown(paths.explain(str(err)))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout left (`arenaseg adapt ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented recipe
        written = PUBLISHED[published:]
        print("arenaseg: standard output was closed (broken pipe); "
              + (f"written: {', '.join(shown(p) for p in written)}" if written else "no output was written"),
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Exception) as err:
        if not isinstance(err, KeyboardInterrupt):
            if not _terminating:
                raise
            err = Terminated(_terminating[0])  # the signal landed in a library's C code, which raised its own error
        if previous is not None:  # stays so: a late signal must not turn this exit into a kill
            for ending in ENDING:
                signal.signal(ending, signal.SIG_IGN)
            previous = None
        cause = ENDING[err.signum] if isinstance(err, Terminated) else "interrupted"
        written = PUBLISHED[published:]
        outcome = (f"after writing {', '.join(shown(p) for p in written)}" if written
                   else "no output was written")
        print(f"\narenaseg: {cause}; {outcome}", file=sys.stderr)  # after a bar
        return 128 + err.signum if isinstance(err, Terminated) else 130
    finally:
        paths.close()
        if previous is not None:
            for ending, handler in previous.items():
                signal.signal(ending, handler)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
    return 0


if __name__ == "__main__":
    sys.exit(main())
