"""The r x r work of SDS-LoRA and preconditioned LoRA: one batched call per backward vs one
call per layer (``sds_vision/methods/rxr.py``), counted with the torch profiler.

    python benchmarks/speed/rxr.py --threads 1                 # vit_small, 224 px, batch 4
    python benchmarks/speed/rxr.py --quick                     # smoke run (test_vit, 32 px)

For each method and each path it reports: the aten operators one training step
(forward + backward) runs in total and inside the r x r work (factorisation calls:
``linalg_eigh`` / ``linalg_cholesky_ex`` / ``linalg_inv_ex``), the CPU time of the r x r work,
and the median step time (paths interleaved, paired ratio). On a GPU every operator is at
least one kernel launch, and ``linalg_eigh`` also waits for the device to check its result,
so the operator and factorisation counts are the numbers that carry over; the CPU times do
not. Writes ``rxr.md`` / ``rxr.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sds_vision import adapter_modules, create_sds_model
from sds_vision.fileio import atomic_write_text
from sds_vision.methods import rxr

FACTORISATIONS = ("aten::linalg_eigh", "aten::linalg_cholesky_ex", "aten::linalg_inv_ex")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small", help="timm name or alias (random init)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per path")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (test_vit, 32 px)")
    p.add_argument("--out", default="runs/speed", help="directory for rxr.md / rxr.json")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.img_size, args.batch_size, args.repeats = "test_vit", 32, 2, 2
    return args


@contextmanager
def per_layer_path(enabled: bool):
    """Force the per-layer path (no group: each backward factorises its own layer)."""
    if not enabled:
        yield
        return
    with mock.patch.object(rxr, "register", lambda *a, **k: None):
        yield


def step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _labelled(fn):
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function("rxr"):
            return fn(*args, **kwargs)
    return wrapper


def count_ops(model, x, y, per_layer: bool) -> dict:
    """Operators of one step, and those of the r x r work (Gram matrices and their
    factorisations: ``rxr.gram`` / ``rxr.transform``, labelled for the profiler)."""
    with per_layer_path(per_layer), \
            mock.patch.object(rxr, "gram", _labelled(rxr.gram)), \
            mock.patch.object(rxr, "transform", _labelled(rxr.transform)), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, x, y)
    events = [e for e in prof.events() if e.name != "rxr"]

    def inside(e):
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name == "rxr":
                return True
        return False

    labels = [e for e in prof.events() if e.name == "rxr"]
    return {"ops_step": len(events), "ops_rxr": sum(inside(e) for e in events),
            "factorisations": sum(e.name in FACTORISATIONS for e in events),
            "rxr_cpu_ms": sum(e.cpu_time_total for e in labels) / 1e3}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    result = {"setting": vars(args), "methods": {}}
    lines = [f"{args.model} {args.img_size}px batch {args.batch_size}, rank {args.rank}, "
             f"{torch.get_num_threads()} CPU threads; one training step (forward + backward)", "",
             "| method | path | adapted layers | factorisation calls | operators in r x r work | "
             "operators per step | r x r CPU ms | step median s |", "|---|---|---:|---:|---:|"
             "---:|---:|---:|"]
    for method in ("sds_lora", "precond_lora"):
        model = create_sds_model(args.model, num_classes=10, method=method, rank=args.rank,
                                 img_size=args.img_size)
        with torch.no_grad():  # non-zero B so both sides have full-rank factors
            for _, m in adapter_modules(model):
                m.lora_B.normal_(0, 0.02)
        layers = sum(1 for _ in adapter_modules(model))
        for per_layer in (False, True):
            with per_layer_path(per_layer):
                step(model, x, y)  # warm-up
        times = {False: [], True: []}
        for rep in range(args.repeats):
            for per_layer in ((False, True) if rep % 2 else (True, False)):
                with per_layer_path(per_layer):
                    t = time.perf_counter()
                    step(model, x, y)
                    times[per_layer].append(time.perf_counter() - t)
        rows = {}
        for per_layer in (False, True):
            c = count_ops(model, x, y, per_layer)
            c["step_s"] = statistics.median(times[per_layer])
            rows["per_layer" if per_layer else "batched"] = c
            lines.append(f"| {method} | {'per layer' if per_layer else 'batched'} | {layers} | "
                         f"{c['factorisations']} | {c['ops_rxr']} | {c['ops_step']} | "
                         f"{c['rxr_cpu_ms']:.1f} | {c['step_s']:.3f} |")
        rows["step_ratio_batched_over_per_layer"] = statistics.median(
            a / b for a, b in zip(times[False], times[True]))
        result["methods"][method] = rows
    lines += ["", "| method | step time batched / per layer (paired median) |", "|---|---:|"]
    lines += [f"| {m} | {r['step_ratio_batched_over_per_layer']:.3f} |"
              for m, r in result["methods"].items()]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rxr.md", text + "\n")
    atomic_write_text(out / "rxr.json", json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
