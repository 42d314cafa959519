"""`sds-vision demo`: the whole pipeline offline on a CPU in a few minutes.

1. Generate small synthetic image-folder tasks as real PNG files (cached).
2. Pretrain a tiny ViT from scratch on the source task, ``orientation`` (cached checkpoint,
   reused on rerun; its val top-1 is reported, ~90% on 4 classes vs 25% chance).
3. Adapt it to each target task (default ``texture`` and ``count``) with linear probing,
   LoRA, SDS-LoRA and full fine-tuning, each through `finetune` (the code path of
   `sds-vision finetune`, with `pretrained=True, checkpoint_path=<source checkpoint>`;
   the head is replaced), with a per-method learning rate (``METHOD_LR``, shown in the table).
4. Print a markdown table and plot the loss curves (one panel per task).

The model is timm's ``test_vit`` (width 64, 2 heads) with 4 blocks on 16x16 images cut in
4x4 patches: 16 tokens, small enough that a CPU pretrains it to a useful source model in
about a minute. Training uses no augmentation (random-resized crops cut the small objects
out of the picture, and a horizontal flip swaps the 45/135 degree orientation classes).
Every number in the table comes from the runs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .config import AdapterConfig
from .data.synthetic import TARGET_TASKS, TASKS, make_demo_data
from .errors import UserError
from .fileio import atomic_write_json, atomic_write_text
from .methods import METHODS

DEMO_METHODS = ("linear", "lora", "sds_lora", "full")
# Per-method peak lr (AdamW, cosine, 1 warmup epoch): adapters and the new head take a
# larger lr than full fine-tuning, which forgets the source features at 1e-2. A low-rank
# method without an entry uses LoRA's.
METHOD_LR = {"linear": 3e-2, "lora": 1e-2, "sds_lora": 1e-2, "full": 1e-3}
PROFILES = {  # train/class, val/class, source epochs, target epochs (batch 32)
    "full": dict(n_train=256, n_val=128, source_epochs=40, target_epochs=9),
    "quick": dict(n_train=16, n_val=8, source_epochs=3, target_epochs=2),
}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
        help="tiny smoke version (under 30 s on a 2-core CPU, start-up included)")
    p.add_argument("--out", default="runs/demo",
        help="where runs, table and plot go (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
        help="cache for generated data and the pretrained source model (default $SDS_VISION_CACHE "
             "or ~/.cache/sds_vision/demo)")
    p.add_argument("--tasks", default=",".join(TARGET_TASKS[:2]),
        help=f"comma-separated target tasks out of {', '.join(TARGET_TASKS)} "
             f"(default: %(default)s)")
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
        help=f"comma-separated methods out of {', '.join(METHODS)} (default: %(default)s)")
    p.add_argument("--rank", type=int, default=4, help="adapter rank (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
        help=f"target fine-tuning epochs (default {PROFILES['full']['target_epochs']}, "
             f"--quick {PROFILES['quick']['target_epochs']})")
    p.add_argument("--seed", type=int, default=0,
        help="seed for data, pretraining and fine-tuning (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
        help="DataLoader workers (default: %(default)s, fastest for tiny images)")
    p.add_argument("--threads", type=int, default=1,
        help="torch CPU threads (default: %(default)s: the tiny model gains nothing from more, "
             "and they stall when another process shares the cores; 0 = torch's default)")


def _cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("SDS_VISION_CACHE")
    return Path(env) / "demo" if env else Path.home() / ".cache" / "sds_vision" / "demo"


def run_demo(out: str | Path, *, quick: bool = False, cache_dir: str | None = None,
             tasks=None, methods=None, rank: int = 4, epochs: int | None = None, seed: int = 0,
             workers: int = 0, threads: int | None = 1, log=print) -> list[dict]:
    """Run the demo; returns one result row per (task, method) and writes table + plot.

    ``threads``: torch intra-op threads while the demo runs (restored afterwards; None
    leaves torch's setting). The default 1 is deliberate: the demo's matrices are tiny, so
    a second thread buys almost nothing, and when another process keeps a core busy
    OpenMP's barrier waits made a training step ~40x slower with 2 threads (1.6 s vs 0.04 s
    per step of batch 64 on a 2-core machine)."""
    import torch
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, quick=quick, cache_dir=cache_dir, tasks=tasks, methods=methods,
                         rank=rank, epochs=epochs, seed=seed, workers=workers, log=log)
    finally:
        torch.set_num_threads(prev)


def _run_demo(out, *, quick, cache_dir, tasks, methods, rank, epochs, seed, workers, log):
    # torch, timm and the engine load here, not when the CLI builds its parser
    from . import transfer
    from .train.finetune import finetune
    from .train.plots import plot_comparison

    t_start = time.perf_counter()
    prof = PROFILES["quick" if quick else "full"]
    tasks = list(tasks or TARGET_TASKS[:2])
    methods = list(methods or DEMO_METHODS)
    bad = [t for t in tasks if t not in TARGET_TASKS] + [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown task/method {bad}; tasks: {', '.join(TARGET_TASKS)}, "
                        f"methods: {', '.join(METHODS)}")
    out, cache = Path(out), _cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    data_root = cache / f"data_{prof['n_train']}_{prof['n_val']}_{transfer.IMG_SIZE}_{seed}"
    make_demo_data(data_root, prof["n_train"], prof["n_val"], transfer.IMG_SIZE, seed)
    log(f"data: {len(TASKS)} synthetic tasks in {data_root} ({prof['n_train']} train / "
        f"{prof['n_val']} val images per class)")
    source, source_meta = transfer.pretrain_source(
        data_root, cache, epochs=prof["source_epochs"], seed=seed, n_train=prof["n_train"],
        n_val=prof["n_val"], workers=workers, log=log)

    rows, curves = [], {}
    for task in tasks:
        curves[task] = {}
        for method in methods:
            lr = METHOD_LR.get(method, METHOD_LR["lora"])
            cfg = transfer.base_config(method=method, adapter=AdapterConfig(rank=rank), lr=lr,
                                       seed=seed, epochs=epochs or prof["target_epochs"],
                                       pretrained=True, checkpoint_path=str(source),
                                       num_workers=workers, out_dir=str(out / task / method),
                                       overwrite=True)
            final = finetune(cfg, data_root / task, aug="none")
            curves[task][method] = transfer.train_curve(out / task / method)
            row = {"task": task, "method": method, "trainable_params": final["params"]["trainable"],
                   "train_loss": final["train_loss"], "val_top1": final["val_top1"],
                   "seconds": final["seconds"], "lr": cfg.lr}
            rows.append(row)
            log(f"  {task:<12} {method:<9} val top-1 {row['val_top1']:6.2f}%  "
                f"train loss {row['train_loss']:.4f}  {row['seconds']:.1f}s")

    table = markdown_table(rows)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_json(out / "results.json", {"source": source_meta, "rows": rows})
    plot_comparison(curves, out / "loss_curves.png",
                    title=f"tiny ViT pretrained on {source_meta['task']}, adapted per task "
                          f"(rank {rank})")
    log("")
    log(f"source: tiny ViT ({transfer.MODEL}, depth {transfer.ARCH['depth']}, "
        f"{transfer.IMG_SIZE} px) pretrained on '{source_meta['task']}': val top-1 "
        f"{source_meta['val_top1']:.2f}% (chance {100 / source_meta['num_classes']:.0f}%)")
    log(f"targets: {prof['n_train']} train / {prof['n_val']} val images per class, "
        f"{epochs or prof['target_epochs']} epochs, batch 32, AdamW, rank {rank}, "
        f"lr per method (column lr)")
    log("")
    log(table)
    log(f"\nplot: {out / 'loss_curves.png'}  runs: {out}/<task>/<method>/  "
        f"total {time.perf_counter() - t_start:.1f}s")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | method | trainable params | final train loss | val top-1 (%) | seconds "
             "| lr |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['trainable_params']:,} | "
                     f"{r['train_loss']:.4f} | {r['val_top1']:.2f} | {r['seconds']:.1f} | "
                     f"{r['lr']:g} |")
    return "\n".join(lines)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_demo_from_args(a: argparse.Namespace) -> int:
    run_demo(a.out, quick=a.quick, cache_dir=a.cache_dir, tasks=_split(a.tasks),
             methods=_split(a.methods), rank=a.rank, epochs=a.epochs, seed=a.seed,
             workers=a.workers, threads=a.threads or None)
    return 0
