"""Small vision transfer: a tiny ViT pretrained on one generated task, adapted to another.

Data: ``sds_vision.data.make_demo_data`` (generated PNG tasks). A tiny ViT (timm
``test_vit``: width 64, 2 heads; here depth 4, 16x16 images, patch 4) is pretrained with
``method="full"`` through ``sds_vision.train.fit`` on the SOURCE task, saved as a
safetensors state dict, and loaded through ``TrainConfig(pretrained=True,
checkpoint_path=...)`` (timm drops its head: a fresh head per target run). Then every
method x lr x seed is one ``fit`` run on the target task: AdamW, cosine schedule with a
1-epoch warmup, the engine's defaults otherwise (weight decay 1e-4, grad-clip 1.0), no
augmentation (images are decoded once; pixels scaled to [-1, 1]), adapters of rank 4 on
every default ViT target (qkv, proj, fc1, fc2). LoRA and SDS-LoRA runs carry a
``GradientDiagnostics`` callback (METHOD.md claims 1-2 on real training).

Best lr per method = the lowest mean (over seeds) final train loss (the mean over the last
epoch): this part measures optimisation; val top-1 is reported at that lr.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sds_vision.diagnostics import GradientDiagnostics, summarize

MODEL = "test_vit"
MODEL_KWARGS = dict(depth=4, patch_size=4)
IMG_SIZE = 16
METHODS = ("linear", "lora", "sds_lora", "full")


class TensorImages(Dataset):
    """Decoded images as one float tensor; yields ``(3xHxW tensor, int label)``."""

    def __init__(self, samples: list[tuple[Path, int]]):
        from sds_vision.data import load_image_rgb
        imgs = np.stack([load_image_rgb(p) for p, _ in samples])
        self.x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        self.y = [int(lab) for _, lab in samples]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def load_task(root: Path, task: str) -> tuple[TensorImages, TensorImages, int]:
    from sds_vision.data import ImageFolderSplits
    splits = ImageFolderSplits(root / task)
    return TensorImages(splits.train), TensorImages(splits.val), len(splits.classes)


def _cfg(**kw):
    from sds_vision.train import TrainConfig
    base = dict(model=MODEL, img_size=IMG_SIZE, extra_timm_kwargs=dict(MODEL_KWARGS),
                num_workers=0, progress=False, overwrite=True, warmup_epochs=1,
                log_every_steps=5, amp=False)
    return TrainConfig(**{**base, **kw})


def pretrain_source(out: Path, data_root: Path, source: str, epochs: int, log=print) -> Path:
    """Full fine-tuning from random init on the source task -> ``source.safetensors``
    (cached: reused when it exists for the same settings)."""
    from safetensors.torch import save_file

    from sds_vision.train import build_model, fit
    ckpt = out / "source.safetensors"
    meta = {"source": source, "epochs": epochs, "model": MODEL, "kwargs": MODEL_KWARGS,
            "img_size": IMG_SIZE, "data_root": str(data_root)}
    meta_path = out / "source.json"
    if ckpt.exists() and meta_path.exists() and json.loads(meta_path.read_text()).get("meta") == meta:
        log(f"  source checkpoint reused: {ckpt}")
        return ckpt
    train_ds, val_ds, ncls = load_task(data_root, source)
    cfg = _cfg(method="full", epochs=epochs, batch_size=64, lr=2e-3, weight_decay=0.05,
               seed=0, out_dir=str(out / "source_run"))
    model = build_model(cfg, ncls)
    res = fit(cfg, train_ds, val_ds, ncls, model=model)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(ckpt))
    meta_path.write_text(json.dumps({"meta": meta, "val_top1": res["val_top1"],
                                     "train_loss": res["train_loss"]}, indent=1))
    log(f"  source ({source}) pretrained: val top-1 {res['val_top1']:.1f}%, "
        f"train loss {res['train_loss']:.3f}, {res['seconds']:.0f}s")
    return ckpt


def run_transfer(out: Path, data_root: Path, target: str, ckpt: Path,
                 lr_grids: dict[str, tuple[float, ...]], seeds, steps: int, rank: int = 4,
                 batch_size: int = 32, diag_every: int = 25, log=print) -> dict:
    """Every method x lr x seed on ``target``; returns raw numbers (JSON-able)."""
    from sds_vision.train import fit
    train_ds, val_ds, ncls = load_task(data_root, target)
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    epochs = max(2, round(steps / steps_per_epoch))
    runs = []
    for method, lrs in lr_grids.items():
        for lr in lrs:
            for seed in seeds:
                run_dir = out / "runs" / f"{method}_lr{lr:g}_s{seed}"
                cfg = _cfg(method=method, rank=rank, epochs=epochs, batch_size=batch_size,
                           lr=lr, seed=seed, pretrained=True, checkpoint_path=str(ckpt),
                           out_dir=str(run_dir))
                diag = GradientDiagnostics(every=diag_every, plot=False) \
                    if method in ("lora", "sds_lora") else None
                res = fit(cfg, train_ds, val_ds, ncls, callbacks=[diag] if diag else [])
                curve = [[r["step"], r["train_loss"]] for r in
                         map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())]
                epoch_rows = [json.loads(line) for line in
                              (run_dir / "metrics.jsonl").read_text().splitlines()]
                row = {"method": method, "lr": lr, "seed": seed, "train_loss": res["train_loss"],
                       "val_top1": res["val_top1"], "steps": res["steps"], "epochs": epochs,
                       "seconds": res["seconds"], "curve": curve,
                       "epoch_train_loss": [[r["step"], r["train_loss"]] for r in epoch_rows],
                       "trainable_params": res["params"]["trainable"]}
                if diag is not None:
                    row["diagnostics"] = summarize(diag.rows)
                    row["diagnostic_rows"] = diag.rows
                runs.append(row)
                log(f"  transfer {method:8s} lr={lr:<7g} seed={seed} train loss "
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
                 "trainable_params": rows[0]["trainable_params"]}
        if "diagnostics" in rows[0]:
            for m in ("erank_gA", "erank_gB", "cos_update"):
                v = np.array([r["diagnostics"][m] for r in rows])
                entry[f"{m}_mean"] = float(v.mean())
                entry[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        best[method] = entry
    if all(m in best for m in ("lora", "sds_lora", "full")):
        lo, sd, fu = (np.array(best[m]["train_loss_per_seed"]) for m in ("lora", "sds_lora", "full"))
        gap = lo.mean() - fu.mean()
        best["gap_closed"] = float((lo.mean() - sd.mean()) / gap) if gap != 0 else math.nan
        if len(lo) == len(sd) == len(fu):
            per_seed = (lo - sd) / (lo - fu)
            best["gap_closed_per_seed"] = per_seed.tolist()
        best["sds_vs_lora_rel_loss"] = float(1 - sd.mean() / lo.mean())
    return best
