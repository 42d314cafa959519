"""The tiny-ViT transfer experiment shared by the demo and the convergence benchmark.

A tiny ViT (timm ``test_vit``: width 64, 2 heads; here depth 4 on 16x16 images cut in 4x4
patches, 16 tokens) is pretrained from scratch with ``method="full"`` on the synthetic
SOURCE task (``orientation``), through ``finetune`` (the ``sds-vision finetune`` code
path, no augmentation: a flip would swap the 45 and 135 degree classes). The checkpoint
is cached under a hash of every setting that shapes it, written atomically. Target runs
then load it with ``pretrained=True, checkpoint_path=<source>`` (timm drops its head).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from .data import ImageFolderSplits, load_image_rgb
from .data.synthetic import SOURCE_TASK
from .data.transforms import build_transform
from .fileio import atomic_write, atomic_write_json
from .train.config import TrainConfig
from .train.engine import build_model
from .train.finetune import data_config, finetune
from .train.rundir import CLASSES, STEPS, RunDir

MODEL = "test_vit"
ARCH = {"patch_size": 4, "depth": 4}
IMG_SIZE = 16
SOURCE_TRAIN = dict(lr=2e-3, weight_decay=0.05, batch_size=64)
_CACHE_VERSION = 3  # bump when pretraining changes, so cached checkpoints are not reused


def base_config(**kw) -> TrainConfig:
    """The experiment's `TrainConfig`: tiny ViT, no workers, quiet, one warm-up epoch."""
    base = dict(model=MODEL, img_size=IMG_SIZE, batch_size=32, warmup_epochs=1,
                weight_decay=1e-4, num_workers=0, progress=False, log_every_steps=1,
                extra_timm_kwargs=dict(ARCH))
    return TrainConfig(**{**base, **kw})


class _KeepModel:
    """Callback: save the final weights of the source run as a plain timm checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, ctx):
        sd = {k: v.detach().cpu().contiguous() for k, v in ctx.model.state_dict().items()}
        atomic_write(self.path, lambda tmp: save_file(sd, tmp))


def pretrain_source(data_root: Path, cache: Path, *, epochs: int, seed: int, n_train: int,
                    n_val: int, workers: int = 0, log=print) -> tuple[Path, dict]:
    """Train the tiny ViT from scratch on the source task once; later calls reuse the file.

    ``n_train`` / ``n_val`` (images per class of the generated data) only key the cache.
    Returns the checkpoint and the source run's metrics (saved next to it)."""
    key = json.dumps({"model": MODEL, "arch": ARCH, "img": IMG_SIZE, "seed": seed,
                      "task": SOURCE_TASK, "n_train": n_train, "n_val": n_val,
                      "epochs": epochs, "train": SOURCE_TRAIN, "v": _CACHE_VERSION},
                     sort_keys=True)
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    ckpt = Path(cache) / f"source_{SOURCE_TASK}_{tag}.safetensors"
    meta_path = ckpt.with_suffix(".json")
    if ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log(f"source model: cached {ckpt} ('{SOURCE_TASK}', val top-1 {meta['val_top1']:.1f}%, "
            f"chance {100 / meta['num_classes']:.0f}%)")
        return ckpt, meta
    t0 = time.perf_counter()
    cfg = base_config(method="full", epochs=epochs, seed=seed, num_workers=workers,
                      out_dir=str(Path(cache) / f"source_run_{tag}"), overwrite=True,
                      **SOURCE_TRAIN)
    final = finetune(cfg, Path(data_root) / SOURCE_TASK, aug="none", hflip=False,
                     callbacks=[_KeepModel(ckpt)])
    ncls = len(RunDir(cfg.out_dir).read_json(CLASSES))
    meta = {"task": SOURCE_TASK, "val_top1": final["val_top1"], "train_loss": final["train_loss"],
            "num_classes": ncls, "seconds": time.perf_counter() - t0}
    atomic_write_json(meta_path, meta)
    log(f"source model: pretrained on '{SOURCE_TASK}' in {meta['seconds']:.1f}s, "
        f"val top-1 {final['val_top1']:.1f}% (chance {100 / ncls:.0f}%), "
        f"train loss {final['train_loss']:.4f} -> {ckpt}")
    return ckpt, meta


def train_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """``(step, train loss)`` of every logged step of a run."""
    return [(r["step"], r["train_loss"]) for r in RunDir(run_dir).read_jsonl(STEPS)]


class PreprocessedImages(Dataset):
    """An image-folder split decoded and preprocessed ONCE with ``finetune``'s evaluation
    transform (what ``finetune(aug="none")`` feeds every epoch), held as one tensor:
    many short runs on the same small task skip the per-epoch decoding."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.x = torch.stack([transform(load_image_rgb(p)) for p, _ in samples])
        self.y = [int(lab) for _, lab in samples]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def load_task(root: Path, task: str) -> tuple[PreprocessedImages, PreprocessedImages, int]:
    """(train, val, classes) of a generated task, preprocessed as ``finetune`` would."""
    splits = ImageFolderSplits(Path(root) / task)
    tf = build_transform(data_config(build_model(base_config(method="linear"),
                                                 len(splits.classes)), IMG_SIZE), train=False)
    return (PreprocessedImages(splits.train, tf), PreprocessedImages(splits.val, tf),
            len(splits.classes))
