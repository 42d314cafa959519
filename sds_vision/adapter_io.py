"""Adapter files: save / load what was trained, rebuild a model, export for peft.

Native format (a directory):
    adapter_model.safetensors   peft-style keys ``base_model.model.<module>.lora_A.weight``
                                (``(k, r, in)`` / ``(k, m, r)`` for fused-qkv slices) and the
                                head ``base_model.model.<head>.weight``; for ``full`` every
                                state-dict entry.
    sds_config.json             ``SDSConfig`` + library version; written last, so a directory
                                with it is complete.
``export_peft_adapter`` writes what ``peft.PeftModel.from_pretrained`` loads on the same timm
model: slices become one block-structured rank-``k*r`` LoRA on ``qkv`` with the same scaling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .fileio import atomic_write, atomic_write_json
from .layers import adapter_modules
from .models import SDSConfig, create_sds_model

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "sds_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."


def _config(model: nn.Module) -> SDSConfig:
    cfg = getattr(model, "sds_config", None)
    if not isinstance(cfg, SDSConfig):
        raise ValueError("model has no sds_config: build it with sds_vision.create_sds_model")
    return cfg


def _head_name(model: nn.Module) -> str | None:
    head = model.get_classifier()
    return next((n for n, m in model.named_modules() if m is head), None)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under peft-style keys."""
    cfg = _config(model)
    if cfg.method == "full":
        return {PREFIX + k: v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, mod in adapter_modules(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A
        out[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B
    head = _head_name(model)
    if head is not None:
        for pname, p in model.get_submodule(head).named_parameters():
            out[f"{PREFIX}{head}.{pname}"] = p
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the trained tensors (adapters + head, or everything for ``full``) and the config."""
    out = Path(out_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    meta = dict(_config(model).to_dict(), library="sds_vision", library_version=__version__)
    atomic_write_json(out / CONFIG_FILE, meta)
    return out


def read_config(adapter_dir: str | os.PathLike) -> SDSConfig:
    """Parse ``sds_config.json`` of an adapter directory."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {adapter_dir} an sds_vision adapter dir?")
    try:
        raw = json.loads(path.read_text())
        fields = {k: raw[k] for k in SDSConfig.__dataclass_fields__ if k in raw}
        for key in ("targets", "modules"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return SDSConfig(**fields)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a valid sds_vision config ({e})") from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load adapter (+ head) tensors saved by ``save_adapter`` into ``model``, strictly."""
    cfg, have = read_config(adapter_dir), _config(model)
    wpath = Path(adapter_dir) / WEIGHTS_FILE
    for key in ("model_name", "method", "num_classes", "rank", "targets", "modules"):
        a, b = getattr(cfg, key), getattr(have, key)
        if a != b:
            raise ValueError(f"{wpath}: adapter was made for {key}={a!r}, this model has "
                             f"{key}={b!r}")
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: not found")
    tensors = load_file(str(wpath))
    expected = adapter_state_dict(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{wpath}: keys do not match this model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for key, dst in expected.items():
        if tensors[key].shape != dst.shape:
            raise ValueError(f"{wpath}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"this model expects {tuple(dst.shape)}")
    with torch.no_grad():
        for key, dst in expected.items():
            dst.copy_(tensors[key])
    return model


def load_sds_model(adapter_dir: str | os.PathLike, *, pretrained: bool = False,
                   checkpoint_path: str | os.PathLike | None = None,
                   **timm_kwargs) -> nn.Module:
    """Rebuild the model an adapter directory was made for and load it.

    For ``lora`` / ``sds_lora`` / ``linear`` the frozen backbone comes from ``pretrained`` /
    ``checkpoint_path`` (as when training); a ``full`` adapter holds every weight.
    """
    cfg = read_config(adapter_dir)
    model = create_sds_model(
        cfg.model_name, num_classes=cfg.num_classes, method=cfg.method,
        rank=cfg.rank or 8, alpha=cfg.alpha, targets=cfg.targets, basis=cfg.basis or "polar",
        dropout=cfg.dropout, rslora=cfg.rslora, pretrained=pretrained,
        checkpoint_path=checkpoint_path, **{**cfg.timm_kwargs, **timm_kwargs})
    return load_adapter(model, adapter_dir)


def export_peft_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write a peft LoRA adapter equivalent to ``model``'s (LoRA or SDS-LoRA: same forward).

    Fused-qkv slices become one rank-``k*r`` LoRA on ``qkv``: A stacks the slices' A's, B is
    block-structured (rows outside the slices are zero). Scaling is kept via ``alpha_pattern``.
    """
    cfg = _config(model)
    if cfg.method not in ("lora", "sds_lora"):
        raise ValueError(f"export_peft_adapter needs a lora/sds_lora model, got {cfg.method!r}")
    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    scaling = None
    for name, mod in adapter_modules(model):
        a, b = mod._factors()
        k, r, _ = a.shape
        big_b = torch.zeros(mod.out_features, k * r, dtype=torch.float32)
        for i, (start, stop) in enumerate(mod.slices or [(0, mod.out_features)]):
            big_b[start:stop, i * r:(i + 1) * r] = b[i].detach().float().cpu()
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().reshape(k * r, -1)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = big_b
        targets.append(name)
        scaling = mod.scaling
        if k > 1:
            rank_pattern[name], alpha_pattern[name] = k * r, mod.scaling * k * r
    head = _head_name(model)
    if head is not None:
        for pname, p in model.get_submodule(head).named_parameters():
            tensors[f"{PREFIX}{head}.{pname}"] = p.detach().contiguous().cpu()
    out = Path(out_dir)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(out / PEFT_CONFIG_FILE, {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": cfg.model_name,
        "r": cfg.rank, "lora_alpha": scaling * cfg.rank, "use_rslora": False,
        "target_modules": targets, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "modules_to_save": [head] if head else None,
        "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True})
    return out
