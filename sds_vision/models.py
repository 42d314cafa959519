"""The front door: ``create_sds_model`` builds a timm backbone with adapters for a method."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
from torch import nn

from .inject import family_targets, inject_adapters, parse_targets
from .layers import adapter_modules

METHODS = ("sds_lora", "lora", "full", "linear")

# Short names -> the ImageNet-21k checkpoints the VTAB/FGVC literature uses (BENCHMARKS.md).
MODEL_ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224.augreg_in21k",
    "vit_small": "vit_small_patch16_224.augreg_in21k",
    "vit_base": "vit_base_patch16_224.orig_in21k",
    "vit_large": "vit_large_patch16_224.orig_in21k",
    "swin_tiny": "swin_tiny_patch4_window7_224.ms_in22k",
    "swin_base": "swin_base_patch4_window7_224.ms_in22k",
    "convnext_tiny": "convnext_tiny.fb_in22k",
    "convnext_base": "convnext_base.fb_in22k",
}


@dataclass(frozen=True)
class SDSConfig:
    """What was built; saved next to adapter files and used to rebuild the model."""

    model_name: str
    method: str
    num_classes: int
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    basis: str | None = None
    dropout: float = 0.0
    rslora: bool = False
    modules: tuple[str, ...] = ()
    timm_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_model_name(name: str) -> str:
    """Alias or timm name (with or without a pretrained tag) -> timm name; clear error if unknown."""
    resolved = MODEL_ALIASES.get(name, name)
    if not timm.is_model(resolved.split(".")[0]):
        raise ValueError(f"unknown model {name!r}: not an alias ({', '.join(MODEL_ALIASES)}) "
                         f"nor a timm model name")
    return resolved


def create_sds_model(name: str, *, num_classes: int, method: str = "sds_lora", rank: int = 8,
                     alpha: float | None = None, targets=None, basis: str = "polar",
                     dropout: float = 0.0, rslora: bool = False, pretrained: bool = False,
                     checkpoint_path: str | os.PathLike | None = None,
                     **timm_kwargs) -> nn.Module:
    """Create a timm model adapted for ``method``, with only the right parameters trainable.

    Args:
        name: alias (``vit_base``, ``swin_tiny``, ...; see ``MODEL_ALIASES``) or timm name.
        num_classes: classes of the new head (0 = no head).
        method: ``sds_lora`` / ``lora`` (adapters + head train), ``full`` (everything),
            ``linear`` (head only).
        rank, alpha, targets, basis, dropout, rslora: adapter settings, see
            ``inject.inject_adapters``; ignored for ``full`` and ``linear``.
        pretrained: load pretrained weights, from ``checkpoint_path`` if given (.safetensors,
            .pth or Google .npz), else from an existing Hugging Face cache. Never downloads
            when ``HF_HUB_OFFLINE=1`` or the hub is unreachable: fails with a clear message.
        checkpoint_path: local weights file; implies ``pretrained=True``.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    timm_name = resolve_model_name(name)
    adapted = method in ("sds_lora", "lora")
    if adapted and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    model = _create_timm(timm_name, num_classes, pretrained or checkpoint_path is not None,
                         checkpoint_path, timm_kwargs)
    modules: list[str] = []
    if adapted:
        modules = inject_adapters(model, method, rank, alpha, targets, dropout=dropout,
                                  rslora=rslora, basis=basis)
        plan = parse_targets(family_targets(model), targets)
        targets = tuple(n for key, sl in plan.items() for n in (sl or (key,)))
    set_trainable(model, method)
    model.sds_config = SDSConfig(
        model_name=timm_name, method=method, num_classes=num_classes,
        rank=rank if adapted else None,
        alpha=next(adapter_modules(model))[1].alpha if adapted else None,
        targets=targets if adapted else None, basis=basis if method == "sds_lora" else None,
        dropout=dropout if adapted else 0.0, rslora=rslora if adapted else False,
        modules=tuple(modules), timm_kwargs=dict(timm_kwargs))
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier (``model.get_classifier()``); empty without a head."""
    head = model.get_classifier()
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def set_trainable(model: nn.Module, method: str) -> None:
    """requires_grad: everything (full), head (linear), or adapters + head (LoRA family)."""
    for p in model.parameters():
        p.requires_grad_(method == "full")
    for p in head_parameters(model):
        p.requires_grad_(True)
    for _, mod in adapter_modules(model):
        mod.lora_A.requires_grad_(True)
        mod.lora_B.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``trainable``, ``adapter`` (lora_A/B), ``head``."""
    params = list(model.parameters())
    adapter = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in adapter_modules(model))
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "adapter": adapter, "head": sum(p.numel() for p in head_parameters(model))}


def _create_timm(timm_name: str, num_classes: int, pretrained: bool,
                 checkpoint_path, timm_kwargs: dict) -> nn.Module:
    kwargs = dict(num_classes=num_classes, **timm_kwargs)
    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist")
        overlay = dict(file=str(path))
        if path.suffix == ".npz":  # Google's original ViT checkpoints (VTAB's ViT-B_16.npz)
            overlay["custom_load"] = True
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    if not _hub_weights_available(timm_name):
        raise RuntimeError(
            f"no pretrained weights for {timm_name!r}: not in the Hugging Face cache "
            f"({_hf_cache_dir()}) and the hub is unreachable or HF_HUB_OFFLINE=1. Give a local "
            f"file with checkpoint_path=... (--checkpoint-path), or download it once on a "
            f"machine with network (HF_HOME=... python -c \"import timm; "
            f"timm.create_model('{timm_name}', pretrained=True)\") and copy the cache here")
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except OSError as e:  # LocalEntryNotFoundError and network errors
        raise RuntimeError(f"could not load pretrained weights for {timm_name!r}: {e}. "
                           f"Give a local file with checkpoint_path=...") from None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _hub_weights_available(timm_name: str) -> bool:
    """True when the weights are in the HF cache, or the hub answers within 3 s."""
    from huggingface_hub import constants, try_to_load_from_cache
    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return not constants.HF_HUB_OFFLINE  # non-hub weights: let timm try if online
    repo = repo.split("@")[0]
    for fname in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, fname), str):
            return True
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False

