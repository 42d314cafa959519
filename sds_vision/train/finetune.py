"""Image-folder fine-tuning, evaluation and prediction on top of `fit` (what the CLI runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import timm.data
import torch
import torch.nn as nn

from ..adapter_io import load_adapter
from ..data import IMG_EXTENSIONS, DataError, ImageFolderSplits, load_image_rgb
from ..data.augmentation import DEFAULT_AUG, check_aug
from ..data.folder import check_output_outside
from ..data.transforms import TransformedDataset, build_transform
from ..fileio import atomic_write_json
from ..models import check_model, resolve_model_name, weights_problem
from . import checkpoint as ckpt_io
from .callbacks import Callback
from .config import TrainConfig, TrainError, config_diff
from .engine import build_model, fit
from .metrics import autocast_ctx, evaluate
from .rundir import CLASSES, DATA, RunDir


def data_config(model, img_size: int | None = None) -> dict:
    """timm's data config with the input size the model was built for (models from
    `create_sds_model` record it in their `pretrained_cfg`; `img_size` overrides)."""
    dc = dict(timm.data.resolve_model_data_config(model))
    size = img_size or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size:
        size = (size, size) if isinstance(size, int) else tuple(size)
        dc["input_size"] = (3, *size)
    return dc


def run_data_config(run_dir: str | os.PathLike, model, cfg: TrainConfig) -> dict:
    """The data config a run trained with: data.json's, else the model's at `cfg.img_size`."""
    run = RunDir(run_dir)
    saved = run.read_json(DATA).get("data_config") if (run / DATA).is_file() else None
    return dict(saved) if saved else data_config(model, cfg.img_size)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _WriteDataFiles(Callback):
    """Writes classes.json and data.json once the engine holds the run folder's lock, so
    that a second process on the same folder cannot overwrite them before it fails."""

    def __init__(self, run: RunDir, classes: list[str], meta: dict) -> None:
        self.run, self.classes, self.meta = run, classes, meta

    def on_train_start(self, ctx) -> None:
        if ctx.is_main:
            atomic_write_json(self.run / CLASSES, self.classes)
            atomic_write_json(self.run / DATA, self.meta)


def finetune(cfg: TrainConfig, data: str | os.PathLike, *, val_ratio: float = 0.2,
             skip_corrupt: bool = False, aug: str = DEFAULT_AUG, hflip: bool = True,
             crop_scale: tuple[float, float] | None = None, callbacks=()) -> dict:
    """Fine-tune `cfg.model` on an image folder; the run dir also gets classes.json/data.json.

    Args:
        cfg: the run's settings (`out_dir`, model, method, optimisation, ...).
        data: image folder, `DIR/<class>/*` or `DIR/train|val[|test]/<class>/*`.
        val_ratio: fraction of each class held out when `data` has no `val/`.
        skip_corrupt: drop undecodable images instead of failing.
        aug: training augmentation preset, `none`, `light` (default) or `strong`
            (`sds_vision.data.augmentation`); recorded in data.json with the pipeline.
        hflip: random horizontal flips in `light`/`strong`.
        crop_scale: area range of the `strong` preset's random resized crop.
        callbacks: engine callbacks.

    Everything that can be checked cheaply (model, family, input size, paths, the data
    folder) is checked before anything is written; the run folder's files are written
    under the engine's lock.
    """
    crop = check_aug(aug, crop_scale)
    check_model(cfg.model, cfg.method, img_size=cfg.img_size,
                timm_kwargs=cfg.extra_timm_kwargs)  # fail before scanning any data
    check_output_outside(data, cfg.out_dir)
    run = RunDir(cfg.out_dir)
    mode = run.check(cfg.resume, cfg.overwrite)
    data_meta = {"data": str(Path(data).resolve()), "val_ratio": val_ratio,
                 "skip_corrupt": skip_corrupt, "aug": aug, "hflip": hflip,
                 "crop_scale": list(crop) if aug == "strong" else None}
    classes = None
    if mode in ("resume", "finished") and (run / DATA).is_file():
        saved = run.read_json(DATA)
        classes = saved.get("classes")
        diff = config_diff({k: saved.get(k) for k in data_meta}, data_meta)
        if diff:
            raise TrainError(f"--resume with different data settings than the run in {run.path}: "
                             + "; ".join(diff))
    if cfg.pretrained and mode != "finished":  # before scanning a large folder
        problem = weights_problem(resolve_model_name(cfg.model), cfg.checkpoint_path)
        if problem:
            raise TrainError(problem)
    splits = ImageFolderSplits(data, val_ratio=val_ratio, seed=cfg.seed, skip_corrupt=skip_corrupt,
                               classes=classes)
    if len(splits.classes) < 2:
        raise TrainError(f"{data}: need at least 2 classes, found {len(splits.classes)}")
    model = build_model(cfg, len(splits.classes))
    dc = data_config(model, cfg.img_size)
    train_tf = build_transform(dc, train=True, aug=aug, hflip=hflip, crop_scale=crop_scale,
                               seed=cfg.seed)
    eval_tf = build_transform(dc, train=False)
    pipeline = {"train": train_tf.describe(), "eval": eval_tf.describe()}
    if int(os.environ.get("RANK", "0")) == 0 and cfg.progress and mode != "finished":
        flip = "" if hflip or aug == "none" else ", no flip"
        print(f"augmentation: {aug}{flip}: {pipeline['train']}; eval: {pipeline['eval']}",
              file=sys.stderr, flush=True)
    meta = {**data_meta, "classes": list(splits.classes), "data_config": _jsonable(dc),
            "pipeline": pipeline, "skipped": [str(p) for p in splits.skipped]}
    return fit(cfg, TransformedDataset(splits.train, train_tf),
               TransformedDataset(splits.val, eval_tf), len(splits.classes), model=model,
               callbacks=[_WriteDataFiles(run, list(splits.classes), meta), *callbacks])


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_run_model(run_dir: str | os.PathLike, weights: str = "final",
                   checkpoint_path: str | None = None) -> tuple[nn.Module, TrainConfig, list[str]]:
    """Rebuild the model a run trained (same base weights) and load its trained tensors.

    `weights`: "final" (`adapter/`, the last epoch) or "best" (`checkpoints/best.pt`).
    `checkpoint_path` overrides where the frozen base weights come from.
    """
    run = RunDir(run_dir)
    cfg, classes = run.read_config(), run.read_classes()
    if checkpoint_path is not None:
        cfg.checkpoint_path, cfg.pretrained = checkpoint_path, True
    if cfg.method == "full" and weights == "final":
        cfg.pretrained, cfg.checkpoint_path = False, None  # adapter/ holds every weight
    model = build_model(cfg, len(classes))
    if weights == "final":
        if not run.adapter.is_dir():
            raise TrainError(f"{run.path}: no adapter/ directory (the run did not finish)")
        load_adapter(model, run.adapter)
    elif weights == "best":
        if not run.best.is_file():
            raise TrainError(f"{run.best}: not found")
        ckpt_io.load_trainable_state_dict(model, ckpt_io.load_checkpoint(run.best)["model"])
    else:
        raise TrainError(f"weights must be 'final' or 'best', got {weights!r}")
    model.eval()
    return model, cfg, classes


def evaluate_run(run_dir: str | os.PathLike, *, data: str | None = None, split: str = "val",
                 weights: str = "final", batch_size: int = 64, num_workers: int = 0,
                 checkpoint_path: str | None = None) -> dict:
    """Metrics of a finished run on a split of its data (same split seed as training), on
    the GPU when there is one."""
    run = RunDir(run_dir)
    model, cfg, classes = load_run_model(run.path, weights, checkpoint_path)
    meta = run.read_json(DATA) if (run / DATA).is_file() else {}
    data = data or meta.get("data")
    if not data:
        raise TrainError("no --data given and the run does not record its data folder")
    splits = ImageFolderSplits(data, val_ratio=meta.get("val_ratio", 0.2), seed=cfg.seed,
                               skip_corrupt=meta.get("skip_corrupt", False), classes=classes)
    samples = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if not samples:
        raise TrainError(f"{data}: has no {split} split")
    device = default_device()
    ds = TransformedDataset(samples, build_transform(data_config(model, cfg.img_size),
                                                     train=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    m = evaluate(_to_device(model, device, cfg), loader, len(classes), device,
                 precision=cfg.precision, channels_last=cfg.channels_last)
    return {"split": split, "weights": weights, "samples": m.pop("val_samples"),
            **{k.replace("val_", "", 1): v for k, v in m.items()},
            "classes": classes}


def _to_device(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """The model on ``device``, in the memory format and matmul precision training used."""
    model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and cfg.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `fit` does for fp32 runs
        torch.backends.cudnn.allow_tf32 = True
    return model


def _collect_images(inputs) -> list[Path]:
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMG_EXTENSIONS
                          and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not out:
        raise TrainError(f"no images found in {', '.join(map(str, inputs))}")
    return out


def _decode(path: Path):
    """Decode one image for predict; a bad file is an error that names it."""
    try:
        return load_image_rgb(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


@torch.no_grad()
def predict_paths(run_dir, inputs, *, top_k: int = 5, batch_size: int = 64,
                  weights: str = "final", checkpoint_path: str | None = None):
    """[(path, [(label, prob), ...])] for image files / folders, and the k used."""
    paths = _collect_images(inputs)
    model, cfg, classes = load_run_model(run_dir, weights, checkpoint_path)
    device = default_device()
    _to_device(model, device, cfg)
    tf = build_transform(data_config(model, cfg.img_size), train=False)
    k = max(1, min(top_k, len(classes)))
    rows = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        x = torch.stack([tf(_decode(p)) for p in chunk]).to(device)
        if device.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, cfg.precision):  # the precision `evaluate` uses
            logits = model(x)
        probs = logits.float().softmax(-1).cpu()
        top = probs.topk(k, dim=-1)
        for p, vals, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
            rows.append((str(p), [(classes[j], v) for j, v in zip(idx, vals)]))
    return rows, k


__all__ = ["finetune", "evaluate_run", "predict_paths", "load_run_model", "data_config",
           "run_data_config"]
