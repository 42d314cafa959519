"""Exports for other tools: a merged plain-timm checkpoint, and a peft LoRA adapter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import timm.data
import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_io import PREFIX, WEIGHTS_FILE, head_name, head_tensors, model_config
from .errors import UserError
from .fileio import atomic_write, atomic_write_json
from .inject import merge_adapters
from .methods import get_method
from .methods.base import adapter_modules
from .models import timm_args

PEFT_CONFIG_FILE = "adapter_config.json"
TIMM_WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG_FILE = "config.json"


def export_peft_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write a peft LoRA adapter whose outputs equal ``model``'s (any low-rank method).

    Each layer exports ``peft_lora()``: an equivalent plain LoRA relative to the frozen
    base weight, with the layer's own scaling (fused-qkv slices become one block-structured
    rank-``k*r`` LoRA; methods whose update has higher rank export that rank). Ranks and
    scalings that differ from the first layer's go to ``rank_pattern`` / ``alpha_pattern``.
    """
    cfg = model_config(model)
    if not get_method(cfg.method).low_rank:
        raise UserError(f"export_peft_adapter needs a low-rank method, got {cfg.method!r}")
    tensors: dict[str, torch.Tensor] = {}
    targets, ranks, alphas, options = [], {}, {}, {}
    for name, mod in adapter_modules(model):
        a, b = mod.peft_lora()
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        for suffix, t in mod.peft_extra().items():  # e.g. DoRA's magnitude vector
            tensors[f"{PREFIX}{name}.{suffix}"] = t.detach().float().cpu().contiguous()
        options.update(mod.peft_options)
        targets.append(name)
        ranks[name], alphas[name] = a.shape[0], mod.scaling * a.shape[0]
    r0, alpha0 = ranks[targets[0]], alphas[targets[0]]
    tensors.update({k: v.detach().contiguous().cpu() for k, v in head_tensors(model).items()})
    head = head_name(model)
    out = Path(out_dir)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(out / PEFT_CONFIG_FILE, {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": cfg.model_name,
        "r": r0, "lora_alpha": alpha0, "use_rslora": False, "target_modules": targets,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha0},
        "modules_to_save": [head] if head else None,
        "lora_dropout": cfg.adapter.dropout, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, **options})
    return out


# The data-config keys timm's `resolve_data_config` reads from a pretrained_cfg.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def export_timm(model: nn.Module, out_dir: str | os.PathLike, classes: list[str],
                data_config: Mapping[str, Any] | None = None) -> Path:
    """Merge adapters and write ``model.safetensors`` + ``config.json`` (timm hub layout),
    with the preprocessing the model was trained with.

    The data config (input size, interpolation, crop_pct/crop_mode, mean, std; default
    ``timm.data.resolve_model_data_config(model)``, which for ``create_sds_model`` models
    has the size they were built for) goes into ``config.json``'s ``pretrained_cfg``. Load:

    - ``timm.create_model("local-dir:<out_dir>", pretrained=True)``; then
      ``timm.data.resolve_data_config(model=model)`` gives the trained preprocessing;
    - or ``timm.create_model(**config["timm_create_model_kwargs"])`` (an absolute
      ``pretrained_cfg_overlay`` file path, so it works from any folder; the overlay holds
      ``num_classes``, without which timm drops the trained head, and the data config);
    - or ``load_state_dict`` on ``timm.create_model(name, num_classes=N, **model_args)``,
      with ``timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"])``.
    """
    sds = model_config(model)
    dc = dict(data_config if data_config is not None
              else timm.data.resolve_model_data_config(model))
    merged = merge_adapters(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in merged.state_dict().items()}
    atomic_write(out / TIMM_WEIGHTS_FILE, lambda tmp: save_file(sd, tmp))
    arch = sds.model_name.split(".")[0]
    data = {k: list(dc[k]) if isinstance(dc[k], (tuple, list)) else dc[k]
            for k in DATA_CONFIG_KEYS if dc.get(k) is not None}
    pcfg = {k: list(v) if isinstance(v, tuple) else v
            for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items()
            if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
            and k not in ("file", "url", "hf_hub_id", "source", "architecture", "tag")}
    pcfg.update(data, num_classes=sds.num_classes)
    model_args = timm_args(sds.model_name, sds.timm_kwargs)
    atomic_write_json(out / TIMM_CONFIG_FILE, {
        "architecture": arch, "model_name": sds.model_name, "num_classes": sds.num_classes,
        "num_features": getattr(model, "num_features", None), "model_args": model_args,
        "label_names": list(classes), "pretrained_cfg": pcfg,
        "timm_create_model_kwargs": {
            "model_name": sds.model_name, "num_classes": sds.num_classes, "pretrained": True,
            "pretrained_cfg_overlay": {"file": str((out / TIMM_WEIGHTS_FILE).resolve()),
                                       "num_classes": sds.num_classes, **data},
            **model_args},
        "exported_from": {"method": sds.method,
                          "rank": sds.adapter.rank if sds.adapter else None,
                          "library": "sds_vision"}})
    return out
