"""Reading a finished run directory back: config, classes, trained model, plain-timm export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..fileio import atomic_write, atomic_write_json
from . import checkpoint as ckpt_io
from .config import TrainConfig, TrainError
from .engine import build_model

CLASSES_FILE = "classes.json"
DATA_FILE = "data.json"


def read_run(run_dir: str | Path) -> tuple[TrainConfig, list[str]]:
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise TrainError(f"{run}: not a run directory (no config.json)")
    if not (run / CLASSES_FILE).is_file():
        raise TrainError(f"{run}: no {CLASSES_FILE} (was it made by `sds-vision finetune`?)")
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    classes = json.loads((run / CLASSES_FILE).read_text())
    return cfg, classes


def load_run_model(run_dir: str | Path, weights: str = "final",
                   checkpoint_path: str | None = None) -> tuple[nn.Module, TrainConfig, list[str]]:
    """Rebuild the model a run trained (same base weights) and load its trained tensors.

    `weights`: "final" (`adapter/`, the last epoch) or "best" (`checkpoints/best.pt`).
    `checkpoint_path` overrides where the frozen base weights come from.
    """
    run = Path(run_dir)
    cfg, classes = read_run(run)
    if checkpoint_path is not None:
        cfg.checkpoint_path, cfg.pretrained = checkpoint_path, True
    if cfg.method == "full" and weights == "final":
        cfg.pretrained, cfg.checkpoint_path = False, None  # adapter/ holds every weight
    model = build_model(cfg, len(classes))
    if weights == "final":
        if not (run / "adapter").is_dir():
            raise TrainError(f"{run}: no adapter/ directory (the run did not finish)")
        from sds_vision import load_adapter
        load_adapter(model, run / "adapter")
    elif weights == "best":
        best = run / "checkpoints" / "best.pt"
        if not best.is_file():
            raise TrainError(f"{best}: not found")
        ckpt_io.load_trainable_state_dict(model, ckpt_io.load_checkpoint(best)["model"])
    else:
        raise ValueError(f"weights must be 'final' or 'best', got {weights!r}")
    model.eval()
    return model, cfg, classes


def export_timm(model: nn.Module, out_dir: str | Path, classes: list[str]) -> Path:
    """Merge adapters and write `model.safetensors` + `config.json` (timm hub layout).

    Load with `timm.create_model(name, num_classes=N, pretrained=True,
    pretrained_cfg_overlay=dict(file=.../model.safetensors, num_classes=N), **model_args)`
    or `load_state_dict` on `timm.create_model(name, num_classes=N, **model_args)`.
    The overlay needs `num_classes=N`: without it timm compares N with the registered
    cfg's class count and drops the trained head.
    """
    from safetensors.torch import save_file

    from sds_vision import merge_adapters
    sds = model.sds_config
    merged = merge_adapters(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in merged.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(sd, tmp))
    arch = sds.model_name.split(".")[0]
    pcfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items()
            if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
            and k not in ("file", "url", "hf_hub_id", "source", "architecture", "tag")}
    pcfg["num_classes"] = sds.num_classes
    if sds.timm_kwargs.get("img_size"):
        s = sds.timm_kwargs["img_size"]
        pcfg["input_size"] = [3, *((s, s) if isinstance(s, int) else s)]
    atomic_write_json(out / "config.json", {
        "architecture": arch, "model_name": sds.model_name, "num_classes": sds.num_classes,
        "num_features": getattr(model, "num_features", None), "model_args": sds.timm_kwargs,
        "label_names": list(classes), "pretrained_cfg": pcfg,
        "timm_create_model_kwargs": {
            "model_name": sds.model_name, "num_classes": sds.num_classes, "pretrained": True,
            "pretrained_cfg_overlay": {"file": "model.safetensors", "num_classes": sds.num_classes},
            **sds.timm_kwargs},
        "exported_from": {"method": sds.method, "rank": sds.rank, "library": "sds_vision"}})
    return out


def predict_batches(model: nn.Module, images: list[torch.Tensor], batch_size: int = 64,
                    device: torch.device | None = None) -> torch.Tensor:
    """Softmax probabilities for a list of preprocessed 3xHxW tensors."""
    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack(images[i:i + batch_size]).to(device)
            out.append(model(x).float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0)
