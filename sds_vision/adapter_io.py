"""Adapter files: save / load what was trained, and rebuild a model from them.

Native format (a directory):
    adapter_model.safetensors   peft-style keys ``base_model.model.<module>.lora_A.weight``
                                (``(k, r, in)`` / ``(k, m, r)`` for fused-qkv slices), any
                                other tensor a method keeps (``adapter_tensors()``) and the
                                head ``base_model.model.<head>.weight``; for ``full`` every
                                state-dict entry.
    sds_config.json             ``SDSConfig`` + library version; written last, so a directory
                                with it is complete.
Exports for other tools (a merged timm checkpoint, a peft adapter) are in ``export.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .errors import UserError
from .fileio import atomic_write, atomic_write_json
from .methods import get_method
from .methods.base import adapter_modules
from .models import SDSConfig, create_sds_model

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "sds_config.json"
PREFIX = "base_model.model."


def model_config(model: nn.Module) -> SDSConfig:
    """The ``SDSConfig`` that ``create_sds_model`` attached to ``model``."""
    cfg = getattr(model, "sds_config", None)
    if not isinstance(cfg, SDSConfig):
        raise UserError("model has no sds_config: build it with sds_vision.create_sds_model")
    return cfg


def head_name(model: nn.Module) -> str | None:
    head = model.get_classifier()
    return next((n for n, m in model.named_modules() if m is head), None)


def head_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classifier's parameters under peft-style keys (``modules_to_save``)."""
    head = head_name(model)
    if head is None:
        return {}
    return {f"{PREFIX}{head}.{p}": t for p, t in model.get_submodule(head).named_parameters()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under peft-style keys."""
    cfg = model_config(model)
    if get_method(cfg.method).trains == "all":
        return {PREFIX + k: v for k, v in model.state_dict().items()}
    out = {f"{PREFIX}{name}.{suffix}": t for name, mod in adapter_modules(model)
           for suffix, t in mod.adapter_tensors().items()}
    return {**out, **head_tensors(model)}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the trained tensors (adapters + head, or everything for ``full``) and the config."""
    out = Path(out_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    meta = dict(model_config(model).to_dict(), library="sds_vision", library_version=__version__)
    atomic_write_json(out / CONFIG_FILE, meta)
    return out


def read_config(adapter_dir: str | os.PathLike) -> SDSConfig:
    """Parse ``sds_config.json`` of an adapter directory."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; is {adapter_dir} an sds_vision adapter dir?")
    try:
        return SDSConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: not a valid sds_vision config ({e})") from None


def _check_same_build(saved: SDSConfig, have: SDSConfig, where: Path) -> None:
    pairs = [("model_name", saved.model_name, have.model_name),
             ("method", saved.method, have.method),
             ("num_classes", saved.num_classes, have.num_classes),
             ("modules", saved.modules, have.modules)]
    if saved.adapter is not None and have.adapter is not None:
        # what the saved tensors mean: rank, placement and the scale s they are applied with
        # (PiSSA's residual W0 - s B0 A0 depends on it too)
        pairs += [(k, getattr(saved.adapter, k), getattr(have.adapter, k))
                  for k in ("rank", "targets", "scaling")]
    for key, a, b in pairs:
        if a != b:
            raise UserError(f"{where}: adapter was made for {key}={a!r}, this model has "
                            f"{key}={b!r}")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load adapter (+ head) tensors saved by ``save_adapter`` into ``model``, strictly."""
    wpath = Path(adapter_dir) / WEIGHTS_FILE
    _check_same_build(read_config(adapter_dir), model_config(model), wpath)
    if not wpath.is_file():
        raise UserError(f"{wpath}: not found")
    tensors = load_file(str(wpath))
    expected = adapter_state_dict(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{wpath}: keys do not match this model (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})")
    for key, dst in expected.items():
        if tensors[key].shape != dst.shape:
            raise UserError(f"{wpath}: {key} has shape {tuple(tensors[key].shape)}, "
                            f"this model expects {tuple(dst.shape)}")
    with torch.no_grad():
        if get_method(model_config(model).method).trains == "all":
            for key, dst in expected.items():
                dst.copy_(tensors[key])
        else:
            for name, mod in adapter_modules(model):  # a method may re-derive state (PiSSA)
                mod.load_adapter_tensors({s: tensors[f"{PREFIX}{name}.{s}"]
                                          for s in mod.adapter_tensors()})
            for key, dst in head_tensors(model).items():
                dst.copy_(tensors[key])
    return model


def load_sds_model(adapter_dir: str | os.PathLike, *, pretrained: bool = False,
                   checkpoint_path: str | os.PathLike | None = None,
                   **timm_kwargs) -> nn.Module:
    """Rebuild the model an adapter directory was made for and load it.

    For low-rank methods and ``linear`` the frozen backbone comes from ``pretrained`` /
    ``checkpoint_path`` (as when training); a ``full`` adapter holds every weight.
    """
    cfg = read_config(adapter_dir)
    model = create_sds_model(
        cfg.model_name, num_classes=cfg.num_classes, method=cfg.method, adapter=cfg.adapter,
        pretrained=pretrained, checkpoint_path=checkpoint_path,
        **{**cfg.timm_kwargs, **timm_kwargs})
    return load_adapter(model, adapter_dir)
