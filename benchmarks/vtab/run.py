"""Run a benchmark sweep (VTAB-1k, FGVC or the SDS-LoRA paper's suite): every (task,
method, seed) is one engine run directory.

    python benchmarks/vtab/run.py --data-root DIR --tasks all --methods sds_lora lora full \
        linear --seeds 0 1 2 --model vit_base --out runs/vtab
    python benchmarks/vtab/run.py --benchmark fgvc --data-root FGVC_DIR --tasks all ...
    python benchmarks/vtab/run.py --benchmark sds_paper --data-root SUITE_DIR ...

The data root is validated first; ``--dry-run`` stops there and prints the plan: the
resolved protocol (benchmarks/vtab/protocol.py) and each method's trainable adapter
parameters beside the published anchor's. Finished runs (``final_metrics.json``) are
skipped; unfinished ones resume from their last checkpoint. One progress line per run.
The report (last epoch and, with ``--best``, the best evaluated epoch, each with its
averages) is written to ``--out`` at the end. With several GPUs, one worker process per
GPU pulls runs from a shared queue.

Scaling (docs/scaling.md): ``--gpus N`` starts one worker process per GPU (``--device cpu``:
N CPU worker processes), pulling runs from a shared queue. ``--shard I/N`` lets N
processes on N nodes share one sweep over a shared filesystem (a Slurm job array, a
Kubernetes indexed job): each run folder is claimed with the run lock, so no run is ever
run twice at once, and a run whose process died is resumed by the next one that visits it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.vtab.protocol import (
    MODES,
    NORMALIZATIONS,
    PLACEMENTS,
    PROTOCOLS,
    TRAIN_FIELDS,
    get_protocol,
    preprocess_for,
    resolve,
)
from benchmarks.vtab.rundir import is_finished, run_dir
from benchmarks.vtab.shard import claim, parse_shard, shard_order
from sds_vision.data.benchmarks import get_benchmark
from sds_vision.data.validate import SplitSizes
from sds_vision.data.vtab import BenchmarkDataError
from sds_vision.fileio import atomic_write_json
from sds_vision.methods import METHODS, get_method
from sds_vision.train.config import PRECISIONS
from sds_vision.train.rundir import BENCH, FINAL, RESULT, RunDir

# bench.json fields that must match when a run directory is resumed.
_IDENTITY = ("benchmark", "task", "method", "seed", "mode", "model", "hparams", "adapter",
             "precision", "eval_every", "preprocess", "pretrained", "checkpoint_path")


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    seed: int


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--benchmark", choices=list(PROTOCOLS), default="vtab",
      help="vtab (VTAB-1k), fgvc (VPT layout) or sds_paper (the SDS-LoRA paper's suite)")
    a("--data-root", required=True, help="the benchmark's data root (docs/benchmarks.md)")
    a("--tasks", nargs="+", default=["all"],
      help="'all', group names (VTAB: natural/specialized/structured) or task names/aliases")
    a("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    a("--seeds", nargs="+", type=int, default=None,
      help="seeds, one run each (default: the protocol's; VTAB/FGVC 0 1 2, sds_paper 1 2 3)")
    a("--model", default="vit_base", help="alias (vit_base = ViT-B/16 orig IN-21k) or timm name")
    a("--out", required=True, help="sweep folder: <out>/<mode>/<task>/<method>/seed<k>/")
    a("--mode", choices=MODES, default="final",
      help="final: train800val200 -> test; tune: train800 -> val200 (FGVC: train -> test / "
           "val; sds_paper: final only)")
    a("--normalization", choices=tuple(NORMALIZATIONS), default=None,
      help="default: the protocol's (imagenet for VTAB/FGVC; inception 0.5/0.5 for sds_paper)")
    a("--pretrained", action=argparse.BooleanOptionalAction, default=True,
      help="load pretrained backbone weights (--no-pretrained for CPU tests)")
    a("--checkpoint-path", default=None, help="local backbone weights instead of the hub")
    a("--placement", choices=list(PLACEMENTS), default=None,
      help="adapter placement for every low-rank method (default: the protocol's; VTAB noah "
           "= one A/B on the fused qkv + dropout 0.1, vpetl = q,v, sds_paper = q,v rsLoRA)")
    a("--precision", choices=PRECISIONS, default="bf16",
      help="CUDA precision: bf16 autocast (fast, default) or fp32 (what the references used)")
    a("--best", action="store_true",
      help="also report the best epoch: final runs evaluate every 10 epochs (FacT's schedule) "
           "and the report adds best-on-test columns and averages")
    # protocol overrides (recorded in bench.json); None = the protocol table
    a("--epochs", type=int, default=None, help="override epochs (VTAB protocol: 100)")
    a("--warmup-epochs", type=int, default=None, help="override warm-up epochs (VTAB: 10)")
    a("--lr", type=float, default=None, help="override lr (VTAB: 1e-3; full 1e-4)")
    a("--weight-decay", type=float, default=None, help="override weight decay (VTAB: 1e-4)")
    a("--batch-size", type=int, default=None, help="override batch size (VTAB: 64)")
    a("--accum-steps", type=int, default=None,
      help="override gradient accumulation steps (sds_paper: 4; others 1)")
    a("--drop-path", type=float, default=None, help="override drop_path (VTAB: 0.1)")
    a("--rank", type=int, default=None, help="override adapter rank (protocol: 8)")
    a("--img-size", type=int, default=224, help="input size (protocol: 224)")
    # speed / environment (not part of the result)
    a("--eval-batch-size", type=int, default=None, help="eval batch (default 512 on GPU, 128 CPU)")
    a("--workers", dest="num_workers", type=int, default=None,
      help="DataLoader workers per run (default: 0 on CPU, up to 8 per GPU)")
    a("--num-workers", dest="num_workers", type=int, default=None, help=argparse.SUPPRESS)
    a("--device", choices=("auto", "cuda", "cpu"), default="auto",
      help="where runs train (auto: CUDA when a GPU is visible)")
    a("--gpus", type=int, default=None,
      help="worker processes, one per GPU (default: all visible GPUs; 1 = in-process); "
           "with --device cpu, that many CPU worker processes")
    a("--compile", action="store_true",
      help="torch.compile the model (opt-in: compiling costs time once per run)")
    a("--threads", type=int, default=None,
      help="torch CPU threads per run (default: torch's; CPU workers share the cores)")
    a("--shard", type=_shard_arg, default=(0, 1), metavar="I/N",
      help="this process is shard I of N sharing --out (0-based; e.g. "
           "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT): it starts with its 1/N of the plan "
           "and then helps with the rest; runs are claimed, never run twice at once")
    a("--cache-dir", default=None, help="decoded uint8 split cache (default <out>/.cache)")
    a("--no-cache", action="store_true", help="decode in memory only, write no cache files")
    a("--eval-every", type=int, default=None,
      help="evaluate every N epochs (default: final mode 0 = last epoch only, or 10 with "
           "--best; tune mode 1)")
    a("--dry-run", action="store_true", help="validate the data root, print the plan, stop")
    a("--no-decode-check", action="store_true", help="validation: check files exist, skip decode")
    a("--expect-sizes", nargs=3, type=int, default=None, metavar=("TR", "VAL", "TRVAL"),
      help="VTAB only: expected train800/val200/train800val200 sizes (default 800 200 1000; "
           "tiny test data differs)")
    a("--no-report", action="store_true", help="do not write the report at the end")
    a("--verbose", action="store_true", help="engine progress bars and per-step logs")
    return ap


def _shard_arg(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _overrides(args) -> dict:
    return {"epochs": args.epochs, "warmup_epochs": args.warmup_epochs, "lr": args.lr,
            "weight_decay": args.weight_decay, "batch_size": args.batch_size,
            "accum_steps": args.accum_steps, "drop_path": args.drop_path, "rank": args.rank}


def _placement(args) -> str:
    return args.placement or get_protocol(args.benchmark).placement


def _seeds(args) -> list[int]:
    return list(args.seeds) if args.seeds else list(get_protocol(args.benchmark).seeds)


def resolve_names(args) -> list[str]:
    bench = get_benchmark(args.benchmark)
    bench.mode_splits(args.mode)  # sds_paper has no tune mode: say so before anything else
    return bench.resolve(args.tasks)


def validate(args, names: list[str]):
    """Check the data root (all splits in a dry run, the mode's otherwise); raises the
    first problem as one line. Returns the report (its counts size the plan)."""
    bench = get_benchmark(args.benchmark)
    options = {"decode": not args.no_decode_check,
               "splits": bench.splits if args.dry_run else bench.mode_splits(args.mode)}
    if args.expect_sizes is not None:
        if not bench.sized_splits:
            raise BenchmarkDataError(f"--expect-sizes applies to VTAB-1k only, not "
                                     f"{args.benchmark}")
        options["sizes"] = SplitSizes(*args.expect_sizes)
    rep = bench.validate(args.data_root, names, **options)
    print(rep.format(), flush=True)
    rep.raise_if_failed()
    return rep


def _schedule_record(hp: dict) -> dict:
    from benchmarks.vtab.plan import describe_schedule
    start = hp["lr"] * 1e-2 if hp["warmup_lr"] is None else hp["warmup_lr"]
    return {"kind": hp["sched"], "stepped_per": hp["sched_per"],
            "warmup_epochs": hp["warmup_epochs"],
            "warmup_start_lr": start if hp["warmup_epochs"] else None,
            "floor_lr": hp["min_lr"], "warmup_prefix": hp["warmup_prefix"],
            "description": describe_schedule(hp)}


def bench_record(args, spec: RunSpec) -> dict:
    """What a run is asked to do, with the protocol resolved (bench.json)."""
    from sds_vision import resolve_model_name
    pre = preprocess_for(args.benchmark, args.img_size, args.normalization)
    proto = get_protocol(args.benchmark)
    tr, ev = get_benchmark(args.benchmark).mode_splits(args.mode)
    hp, sources = resolve(args.benchmark, spec.task, spec.method, _overrides(args))
    placement = PLACEMENTS[_placement(args)]
    every, every_source = _eval_schedule(args)
    return {"benchmark": args.benchmark, "task": spec.task, "method": spec.method,
            "seed": spec.seed, "mode": args.mode, "train_split": tr, "eval_split": ev,
            "model": args.model, "backbone": resolve_model_name(args.model),
            "hparams": hp, "sources": sources, "schedule": _schedule_record(hp),
            "optimizer": "adamw (no weight decay on biases and other 1-D parameters)",
            "adapter": {**placement.to_dict(hp["rank"]),
                        "used": get_method(spec.method).low_rank},
            "precision": args.precision,
            "reference_precision": {"value": proto.reference_precision.value,
                                    "source": proto.reference_precision.source},
            "eval_every": every,
            "best_eval": None if every == 0 else {"every": every, "source": every_source},
            "preprocess": pre.to_dict(),
            "normalization_source": (proto.normalization_source if args.normalization is None
                                     else "command line"),
            "pretrained": args.pretrained, "checkpoint_path": args.checkpoint_path,
            "data_root": str(Path(args.data_root).resolve()),
            "reported_metric": "val_top1 = top-1 on eval_split at the LAST epoch; "
                               "best_val_top1 = max over the evaluated epochs"}


def _eval_schedule(args) -> tuple[int, str]:
    """(evaluate every N epochs, why): final runs evaluate the (large) test split after the
    last epoch only, or on FacT's schedule with --best; tuning runs every epoch."""
    if args.eval_every is not None:
        return args.eval_every, "command line"
    if args.mode != "final":
        return 1, "tune mode: every epoch (the validation split is small)"
    if args.best:
        best = get_protocol(args.benchmark).best_eval_every
        return int(best.value), best.source
    return 0, "final mode: the last epoch only"


def _eval_every(args) -> int:
    return _eval_schedule(args)[0]


def _values(x):
    """A record without its "source" texts: rewording a source changes no result."""
    return {k: v for k, v in x.items() if k != "source"} if isinstance(x, dict) else x


def check_settings(d: Path, rec: dict) -> None:
    """Refuse a run folder (finished or not) that was made with other settings. A folder
    with no training state yet (the run failed before its first checkpoint) takes the new
    settings."""
    old = d / BENCH
    trained = RunDir(d).last.is_file() or (d / FINAL).is_file()
    if old.is_file() and trained:
        prev = json.loads(old.read_text())
        diff = [k for k in _IDENTITY if json.dumps(_values(prev.get(k)), sort_keys=True)
                != json.dumps(_values(rec.get(k)), sort_keys=True)]
        if diff:
            raise BenchmarkDataError(f"{old}: run was made with different settings "
                                     f"({', '.join(diff)}); use another --out or delete it")


def execute(args, spec: RunSpec, data_cache: dict) -> dict:
    """One run: write bench.json, build data (cached per task), call ``fit``."""
    import torch

    from benchmarks.vtab.datasets import build_task_data
    from sds_vision.train import TrainConfig, fit
    d = run_dir(args.out, args.mode, spec.task, spec.method, spec.seed)
    rec = bench_record(args, spec)
    check_settings(d, rec)
    atomic_write_json(d / BENCH, rec)
    cuda = torch.cuda.is_available()  # a worker process sees only its own GPU (or none)
    key = (spec.task, args.mode)
    if key not in data_cache:
        data_cache.clear()  # keep one task's splits in memory (runs are task-major)
        pre = preprocess_for(args.benchmark, args.img_size, args.normalization)
        cache_dir = None if args.no_cache else (args.cache_dir or Path(args.out) / ".cache")
        data_cache[key] = build_task_data(args.benchmark, args.data_root, spec.task, args.mode,
                                          pre, cache_dir, device="cuda" if cuda else None)
    data = data_cache[key]
    hp = rec["hparams"]
    cfg = TrainConfig(
        model=args.model, method=spec.method,
        adapter=PLACEMENTS[rec["adapter"]["placement"]].adapter(hp["rank"]),
        **{k: hp[k] for k in TRAIN_FIELDS}, precision=rec["precision"],
        img_size=args.img_size, seed=spec.seed,
        pretrained=args.pretrained, checkpoint_path=args.checkpoint_path,
        channels_last=True,
        num_workers=args.num_workers if args.num_workers is not None else (
            min(8, max(1, (os.cpu_count() or 2) // max(args.gpus or 1, 1) - 1)) if cuda else 0),
        eval_batch_size=args.eval_batch_size or (512 if cuda else 128),
        eval_every=rec["eval_every"],
        compile=args.compile, threads=args.threads, out_dir=str(d), resume=True,
        progress=args.verbose,
        log_every_steps=50 if not args.verbose else 10)
    final = fit(cfg, data.train, data.eval, data.num_classes)
    best = final["best_val_top1"] if rec["eval_every"] else None
    atomic_write_json(d / RESULT, {**rec, "val_top1": final["val_top1"],
                                   "best_val_top1_selected_on_eval": best,
                                   "seconds": final["seconds"], "params": final["params"]})
    return final


def run_claimed(args, spec: RunSpec, cache: dict) -> tuple[str, dict | None, str | None]:
    """One run while holding its folder's lock: ``(status, final, error)`` with status
    ``done``, ``failed``, ``held`` (another live process holds it; error names it) or
    ``finished`` (another process finished it meanwhile)."""
    d = run_dir(args.out, args.mode, spec.task, spec.method, spec.seed)
    with claim(d) as holder:
        if holder is not None:
            return "held", None, f"pid {holder.get('pid')} on {holder.get('host')}"
        if is_finished(d):
            return "finished", None, None
        try:
            return "done", execute(args, spec, cache), None
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep
            return "failed", None, f"{type(e).__name__}: {e}"


def _worker(args, worker: int, jobs, results) -> None:
    """Worker process: pulls RunSpecs until a None, reports (spec, status, final top-1,
    seconds, error, worker) for each."""
    cache: dict = {}
    while (spec := jobs.get()) is not None:
        t0 = time.time()
        status, final, err = run_claimed(args, spec, cache)
        results.put((spec, status, final and final["val_top1"], time.time() - t0, err, worker))


def _line(i: int, n: int, spec: RunSpec, top1, secs: float, err, where="",
          status: str | None = None) -> str:
    status = status or ("done" if err is None else "failed")
    acc = {"done": lambda: f"top1 {top1:6.2f}", "failed": lambda: f"FAILED ({err})",
           "held": lambda: f"skipped: run by another process ({err})",
           "finished": lambda: "skipped: finished by another process"}[status]()
    return (f"[{i}/{n}] {spec.task:<20} {spec.method:<8} seed {spec.seed}  {acc}  "
            f"{secs:7.1f}s  {n - i} left{where}")


def run_sweep(args) -> int:
    from sds_vision import resolve_model_name
    resolve_model_name(args.model)  # unknown model: fail before validating data
    names = resolve_names(args)
    rep = validate(args, names)
    seeds = _seeds(args)
    plan = [RunSpec(t, m, s) for t in names for m in args.methods for s in seeds]
    done = [p for p in plan if is_finished(run_dir(args.out, args.mode, p.task, p.method, p.seed))]
    for p in done:  # a finished run counts only if it was made with these settings
        check_settings(run_dir(args.out, args.mode, p.task, p.method, p.seed),
                       bench_record(args, p))
    todo = [p for p in plan if p not in done]
    print(f"plan: {len(plan)} runs ({len(names)} tasks x {len(args.methods)} methods x "
          f"{len(seeds)} seeds), {len(done)} finished (skipped), {len(todo)} to run; "
          f"mode {args.mode}, model {args.model}, normalization "
          f"{preprocess_for(args.benchmark, args.img_size, args.normalization).normalization}",
          flush=True)
    _print_plan(args, names, rep)
    problem = None
    if args.pretrained and todo:  # the weights every run will load: say now if they are missing
        from sds_vision.models import weights_problem
        problem = weights_problem(resolve_model_name(args.model), args.checkpoint_path)
    if args.dry_run:
        for p in todo:
            print(f"  would run {p.task} {p.method} seed {p.seed} -> "
                  f"{run_dir(args.out, args.mode, p.task, p.method, p.seed)}")
        if args.pretrained and todo:
            print(f"weights: {problem or 'found'}", flush=True)
        return 2 if problem else 0
    if problem:  # not once per run, after the sweep has started
        raise BenchmarkDataError(problem)
    failures = dispatch(args, plan, todo)
    if not args.no_report:
        from benchmarks.vtab.report import write_report
        try:
            paths = write_report(args.out, mode=args.mode, best=True if args.best else None)
            print(f"report: {paths['report.md']}")
        except ValueError as e:
            print(f"report not written: {e}")
    return 1 if failures else 0


def _print_plan(args, names: list[str], rep) -> None:
    from benchmarks.vtab.plan import parameter_lines, protocol_lines
    bench = get_benchmark(args.benchmark)
    train_split = bench.mode_splits(args.mode)[0]
    sizes = {t.name: t.counts[train_split] for t in rep.tasks if train_split in t.counts}
    rank = resolve(args.benchmark, names[0], args.methods[0], _overrides(args))[0]["rank"]
    for line in protocol_lines(args.benchmark, names, args.methods, _overrides(args), sizes,
                               args.precision, _eval_every(args), _placement(args), rank):
        print(line)
    for line in parameter_lines(args.benchmark, args.model, args.methods, _placement(args), rank,
                                bench.num_classes(names[0]), args.img_size):
        print(line)
    print("", flush=True)


def dispatch(args, plan: list[RunSpec], todo: list[RunSpec]) -> int:
    """Run ``todo`` in this shard's order, in this process or in worker processes (one per
    GPU, or ``--gpus`` CPU workers); returns the number of failed runs. Runs another
    process holds are skipped, then tried once more at the end (their holder may have
    died meanwhile)."""
    import torch
    index, count = args.shard
    pending = set(todo)
    order = [p for p in shard_order(plan, index, count) if p in pending]
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    on_gpu = args.device != "cpu" and cuda
    workers = args.gpus if args.gpus is not None else (
        max(torch.cuda.device_count(), 1) if on_gpu else 1)
    args.gpus = workers
    if count > 1:
        print(f"shard {index}/{count}: starts with runs {len(plan) * index // count + 1}-"
              f"{len(plan) * (index + 1) // count} of the plan, then helps with the others",
              flush=True)
    if not order:
        return 0
    # a CPU run on a machine with GPUs goes to a worker that cannot see them
    in_process = (workers <= 1 or len(order) <= 1) and (on_gpu or not cuda)
    outcomes = _run_here(args, order) if in_process else _run_workers(args, order, workers, on_gpu)
    held = [spec for spec, status in outcomes if status == "held"]
    if held:
        print(f"{len(held)} run(s) held by other processes; trying them once more", flush=True)
        outcomes += (_run_here(args, held) if in_process
                     else _run_workers(args, held, workers, on_gpu))
        held = [spec for spec, status in outcomes[-len(held):] if status == "held"]
        if held:
            print(f"{len(held)} run(s) left to the processes that hold them", flush=True)
    return sum(status == "failed" for _, status in outcomes)


def _run_here(args, order: list[RunSpec]) -> list[tuple[RunSpec, str]]:
    cache: dict = {}
    out = []
    for i, spec in enumerate(order, 1):
        t0 = time.time()
        status, final, err = run_claimed(args, spec, cache)
        out.append((spec, status))
        print(_line(i, len(order), spec, final and final["val_top1"], time.time() - t0, err,
                    status=status), flush=True)
    return out


def _run_workers(args, order: list[RunSpec], workers: int,
                 on_gpu: bool) -> list[tuple[RunSpec, str]]:
    """One spawned process per worker; each sees one GPU (``CUDA_VISIBLE_DEVICES``) or, for
    CPU workers, none at all, so the device a worker trains on is explicit."""
    import multiprocessing as mp
    import queue
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for spec in order:  # task-major order: consecutive runs of a worker share a task's data
        jobs.put(spec)
    if not on_gpu and args.threads is None:  # CPU workers split the cores
        from sds_vision.data.cache import cpu_count
        args.threads = max(1, cpu_count() // workers)
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = saved.split(",") if saved else [str(i) for i in range(workers)]
    try:
        for w in range(workers):
            jobs.put(None)
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[w % len(visible)] if on_gpu else ""
            p = ctx.Process(target=_worker, args=(args, w, jobs, results), daemon=True)
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    out: list[tuple[RunSpec, str]] = []
    while len(out) < len(order):
        try:
            # once every worker has exited, only what they posted before exiting is left
            alive = any(p.is_alive() for p in procs)
            spec, status, top1, secs, err, w = results.get(timeout=10 if alive else 1)
        except queue.Empty:
            if not alive:  # a worker died without reporting
                print(f"workers exited with {len(order) - len(out)} run(s) unreported",
                      flush=True)
                reported = {s for s, _ in out}
                return out + [(s, "failed") for s in order if s not in reported]
            continue
        out.append((spec, status))
        print(_line(len(out), len(order), spec, top1, secs, err, f"  (worker {w})", status),
              flush=True)
    for p in procs:
        p.join()
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_sweep(args)
    except (BenchmarkDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
