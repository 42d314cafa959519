"""Small vision transfer: the tiny ViT of ``sds_vision.transfer``, pretrained on one
generated task, adapted to another by every method.

The source model is ``transfer.pretrain_source`` (the demo's, same cache scheme). Every
variant (``variants.py``: a registry method and its adapter options) x lr x seed is one
``fit`` run on the target task, with the method's own training hooks (LoRA+ parameter
groups, the bases form's start-up and refreshes): AdamW, cosine schedule with a
1-epoch warmup, the engine's defaults otherwise (weight decay 1e-4, grad-clip 1.0), no
augmentation (images decoded and preprocessed once, as ``finetune`` preprocesses them),
adapters of rank 4 on every default ViT target (qkv, proj, fc1, fc2). Low-rank runs carry
a ``GradientDiagnostics`` callback (effective rank, alignment with the full gradient).

Best lr per method = the lowest mean (over seeds) final train loss (the mean over the last
epoch): this part measures optimisation; val top-1 is reported at that lr.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sds_vision import transfer
from sds_vision.config import AdapterConfig
from sds_vision.diagnostics import GradientDiagnostics, summarize
from sds_vision.train import fit
from sds_vision.train.rundir import METRICS_JSONL, RunDir

from .variants import VARIANTS


class _StepCounter:
    """Counts every optimizer step, a method's start-up steps (outside the schedule) too."""

    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, ctx) -> None:
        self.steps += 1


def run_transfer(out: Path, data_root: Path, target: str, ckpt: Path,
                 lr_grids: dict[str, tuple[float, ...]], seeds, steps: int, rank: int = 4,
                 batch_size: int = 32, diag_every: int = 25, log=print) -> dict:
    """Every variant x lr x seed on ``target``; returns raw numbers (JSON-able)."""
    train_ds, val_ds, ncls = transfer.load_task(data_root, target)
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    epochs = max(2, round(steps / steps_per_epoch))
    runs = []
    for method, lrs in lr_grids.items():
        for lr in lrs:
            for seed in seeds:
                run_dir = out / "runs" / f"{method}_lr{lr:g}_s{seed}"
                v = VARIANTS[method]
                cfg = transfer.base_config(
                    method=v.method, adapter=AdapterConfig(rank=rank, **v.options),
                    epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, pretrained=True,
                    checkpoint_path=str(ckpt), out_dir=str(run_dir), overwrite=True,
                    log_every_steps=5)
                diag = GradientDiagnostics(every=diag_every, plot=False) if v.low_rank else None
                counter = _StepCounter()
                res = fit(cfg, train_ds, val_ds, ncls,
                          callbacks=[counter] + ([diag] if diag else []))
                curve = [list(p) for p in transfer.train_curve(run_dir)]
                epoch_rows = RunDir(run_dir).read_jsonl(METRICS_JSONL)
                row = {"method": method, "lr": lr, "seed": seed, "train_loss": res["train_loss"],
                       "val_top1": res["val_top1"], "steps": res["steps"], "epochs": epochs,
                       "seconds": res["seconds"], "curve": curve,
                       "extra_steps": counter.steps - res["steps"],
                       "epoch_train_loss": [[r["step"], r["train_loss"]] for r in epoch_rows],
                       "trainable_params": res["params"]["trainable"]}
                if diag is not None:
                    row["diagnostics"] = summarize(diag.rows)
                    row["diagnostic_rows"] = diag.rows
                runs.append(row)
                log(f"  transfer {method:16s} lr={lr:<7g} seed={seed} train loss "
                    f"{res['train_loss']:.4f} val top-1 {res['val_top1']:.1f}% "
                    f"({res['seconds']:.0f}s)")
    return {"target": target, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
            "rank": rank, "batch_size": batch_size, "seeds": list(seeds),
            "lr_grids": {k: list(v) for k, v in lr_grids.items()}, "runs": runs,
            "train_size": len(train_ds), "val_size": len(val_ds)}


def select_best(res: dict) -> dict:
    """Per method: the lr with the lowest mean final train loss, and stats at that lr."""
    best = {}
    for method, lrs in res["lr_grids"].items():
        per_lr = {}
        for lr in lrs:
            rows = [r for r in res["runs"] if r["method"] == method and r["lr"] == lr]
            tl = np.array([r["train_loss"] for r in rows])
            per_lr[lr] = (float(np.mean(tl)), rows)
        lr = min(per_lr, key=lambda k: per_lr[k][0])
        rows = sorted(per_lr[lr][1], key=lambda r: r["seed"])
        tl = np.array([r["train_loss"] for r in rows])
        acc = np.array([r["val_top1"] for r in rows])
        entry = {"lr": lr, "lr_at_grid_edge": lr in (min(lrs), max(lrs)) and len(lrs) > 1,
                 "train_loss_mean": float(tl.mean()), "train_loss_std": float(tl.std(ddof=1))
                 if len(tl) > 1 else 0.0, "val_top1_mean": float(acc.mean()),
                 "val_top1_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                 "train_loss_per_seed": tl.tolist(), "val_top1_per_seed": acc.tolist(),
                 "trainable_params": rows[0]["trainable_params"],
                 "extra_steps": rows[0].get("extra_steps", 0)}
        if "diagnostics" in rows[0]:
            for m in ("erank_gA", "erank_gB", "cos_update"):
                v = np.array([r["diagnostics"][m] for r in rows])
                entry[f"{m}_mean"] = float(v.mean())
                entry[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        best[method] = entry
    if "lora" in best and "full" in best:  # how much of LoRA's gap to full each one closes
        lo, fu = (np.array(best[m]["train_loss_per_seed"]) for m in ("lora", "full"))
        gap = lo.mean() - fu.mean()
        for method, entry in best.items():
            if method in ("lora", "full", "linear"):
                continue
            me = np.array(entry["train_loss_per_seed"])
            entry["gap_closed"] = float((lo.mean() - me.mean()) / gap) if gap != 0 else math.nan
            if len(lo) == len(me) == len(fu):
                entry["gap_closed_per_seed"] = ((lo - me) / (lo - fu)).tolist()
            entry["vs_lora_rel_loss"] = float(1 - me.mean() / lo.mean())
    return best
