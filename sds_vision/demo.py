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
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# timm's test_vit (width 64, 2 heads) with 4 blocks on 16x16 inputs: 4x4 patches of 4 px.
DEMO_MODEL = "test_vit"
DEMO_ARCH = {"patch_size": 4, "depth": 4}
IMG_SIZE = 16
# Per-method peak lr (AdamW, cosine, 1 warmup epoch): adapters and the new head take a
# larger lr than full fine-tuning, which forgets the source features at 1e-2.
METHOD_LR = {"linear": 3e-2, "lora": 1e-2, "sds_lora": 1e-2, "full": 1e-3}
SOURCE_TRAIN = dict(lr=2e-3, weight_decay=0.05, batch_size=64)
PROFILES = {  # train/class, val/class, source epochs, target epochs (batch 32)
    "full": dict(n_train=256, n_val=128, source_epochs=40, target_epochs=9),
    "quick": dict(n_train=16, n_val=8, source_epochs=3, target_epochs=2),
}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    from sds_vision.data import TARGET_TASKS
    p.add_argument("--quick", action="store_true", help="tiny smoke version (< 30 s)")
    p.add_argument("--out", default="runs/demo",
        help="where runs, table and plot go (default runs/demo)")
    p.add_argument("--cache-dir", default=None,
        help="cache for generated data and the pretrained source model (default $SDS_VISION_CACHE "
             "or ~/.cache/sds_vision/demo)")
    p.add_argument("--tasks", default=",".join(TARGET_TASKS[:2]),
        help=f"comma-separated target tasks out of {', '.join(TARGET_TASKS)} (default: the first "
             f"two)")
    p.add_argument("--methods", default="linear,lora,sds_lora,full",
        help="comma-separated methods (default: all four)")
    p.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    p.add_argument("--epochs", type=int, default=None,
        help=f"target fine-tuning epochs (default {PROFILES['full']['target_epochs']}, "
             f"--quick {PROFILES['quick']['target_epochs']})")
    p.add_argument("--seed", type=int, default=0,
        help="seed for data, pretraining and fine-tuning (default 0)")
    p.add_argument("--workers", type=int, default=0,
        help="DataLoader workers (default 0: fastest for tiny images)")
    p.add_argument("--threads", type=int, default=1,
        help="torch CPU threads (default 1: the tiny model gains nothing from more, and "
             "they stall when another process shares the cores; 0 = torch's default)")


def _cache_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("SDS_VISION_CACHE")
    return Path(env) / "demo" if env else Path.home() / ".cache" / "sds_vision" / "demo"


def _base_config(**kw):
    from sds_vision.train import TrainConfig
    base = dict(model=DEMO_MODEL, img_size=IMG_SIZE, batch_size=32, warmup_epochs=1,
                weight_decay=1e-4, num_workers=0, progress=False, log_every_steps=1,
                extra_timm_kwargs=dict(DEMO_ARCH))
    return TrainConfig(**{**base, **kw})


class _KeepModel:
    """Callback that saves the final weights of the source run as a plain timm checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, ctx):
        from safetensors.torch import save_file

        from sds_vision.fileio import atomic_write
        sd = {k: v.detach().cpu().contiguous() for k, v in ctx.model.state_dict().items()}
        atomic_write(self.path, lambda tmp: save_file(sd, tmp))


def pretrain_source(data_root: Path, cache: Path, prof: dict, seed: int, workers: int,
                    log=print) -> tuple[Path, dict]:
    """Train the tiny ViT from scratch on the source task once; later calls reuse the file.

    Returns the checkpoint and the source run's final metrics (saved next to it)."""
    from sds_vision.data import SOURCE_TASK
    from sds_vision.train.finetune import finetune
    key = json.dumps({"model": DEMO_MODEL, "arch": DEMO_ARCH, "img": IMG_SIZE, "seed": seed,
                      "task": SOURCE_TASK, "n_train": prof["n_train"], "n_val": prof["n_val"],
                      "epochs": prof["source_epochs"], "train": SOURCE_TRAIN, "v": 3},
                     sort_keys=True)
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    ckpt = cache / f"source_{SOURCE_TASK}_{tag}.safetensors"
    meta_path = ckpt.with_suffix(".json")
    if ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log(f"source model: cached {ckpt} ('{SOURCE_TASK}', val top-1 {meta['val_top1']:.1f}%, "
            f"chance {100 / meta['num_classes']:.0f}%)")
        return ckpt, meta
    t0 = time.perf_counter()
    cfg = _base_config(method="full", epochs=prof["source_epochs"], seed=seed,
                       num_workers=workers, out_dir=str(cache / f"source_run_{tag}"),
                       overwrite=True, **SOURCE_TRAIN)
    # No flip: it would swap the 45 and 135 degree classes of `orientation`.
    final = finetune(cfg, data_root / SOURCE_TASK, augment=False, hflip=False,
                     callbacks=[_KeepModel(ckpt)])
    ncls = len(json.loads((Path(cfg.out_dir) / "classes.json").read_text()))
    meta = {"task": SOURCE_TASK, "val_top1": final["val_top1"], "train_loss": final["train_loss"],
            "num_classes": ncls, "seconds": time.perf_counter() - t0}
    from sds_vision.fileio import atomic_write_json
    atomic_write_json(meta_path, meta)
    log(f"source model: pretrained on '{SOURCE_TASK}' in {meta['seconds']:.1f}s, "
        f"val top-1 {final['val_top1']:.1f}% (chance {100 / ncls:.0f}%), "
        f"train loss {final['train_loss']:.4f} -> {ckpt}")
    return ckpt, meta


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
    from sds_vision.data import TARGET_TASKS, TASKS, make_demo_data
    from sds_vision.models import METHODS
    from sds_vision.train.finetune import finetune
    from sds_vision.train.plots import plot_comparison

    t_start = time.perf_counter()
    prof = PROFILES["quick" if quick else "full"]
    tasks = list(tasks or TARGET_TASKS[:2])
    methods = list(methods or ("linear", "lora", "sds_lora", "full"))
    bad = [t for t in tasks if t not in TARGET_TASKS] + [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown task/method {bad}; tasks: {TARGET_TASKS}, methods: {METHODS}")
    out, cache = Path(out), _cache_dir(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    data_root = cache / f"data_{prof['n_train']}_{prof['n_val']}_{IMG_SIZE}_{seed}"
    make_demo_data(data_root, prof["n_train"], prof["n_val"], IMG_SIZE, seed)
    log(f"data: {len(TASKS)} synthetic tasks in {data_root} ({prof['n_train']} train / "
        f"{prof['n_val']} val images per class)")
    source, source_meta = pretrain_source(data_root, cache, prof, seed, workers, log)

    rows, curves = [], {}
    for task in tasks:
        curves[task] = {}
        for method in methods:
            cfg = _base_config(method=method, rank=rank, lr=METHOD_LR[method], seed=seed,
                               epochs=epochs or prof["target_epochs"], pretrained=True,
                               checkpoint_path=str(source), num_workers=workers,
                               out_dir=str(out / task / method), overwrite=True)
            final = finetune(cfg, data_root / task, augment=False)
            steps = [json.loads(line) for line in
                     (out / task / method / "steps.jsonl").read_text().splitlines()]
            curves[task][method] = [(r["step"], r["train_loss"]) for r in steps]
            row = {"task": task, "method": method, "trainable_params": final["params"]["trainable"],
                   "train_loss": final["train_loss"], "val_top1": final["val_top1"],
                   "seconds": final["seconds"], "lr": cfg.lr}
            rows.append(row)
            log(f"  {task:<12} {method:<9} val top-1 {row['val_top1']:6.2f}%  "
                f"train loss {row['train_loss']:.4f}  {row['seconds']:.1f}s")

    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"source": source_meta, "rows": rows},
                                                 indent=2) + "\n")
    plot_comparison(curves, out / "loss_curves.png",
                    title=f"tiny ViT pretrained on {source_meta['task']}, adapted per task "
                          f"(rank {rank})")
    log("")
    log(f"source: tiny ViT ({DEMO_MODEL}, depth {DEMO_ARCH['depth']}, {IMG_SIZE} px) pretrained "
        f"on '{source_meta['task']}': val top-1 {source_meta['val_top1']:.2f}% "
        f"(chance {100 / source_meta['num_classes']:.0f}%)")
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


def main(argv: list[str] | None = None) -> int:
    from sds_vision.cli import main as cli_main
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
