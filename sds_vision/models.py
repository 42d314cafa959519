"""The front door: ``create_sds_model`` builds a timm backbone with adapters for a method."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn

from .config import AdapterConfig
from .errors import UserError
from .inject import family_targets, inject_adapters, parse_targets
from .methods import get_method
from .methods.base import adapter_modules, adapter_parameters

# Short names -> the ImageNet-21k checkpoints the VTAB/FGVC literature uses (docs/benchmarks.md).
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
    """What was built; saved next to adapter files and used to rebuild the model.

    ``adapter`` is None for methods without adapters (``full``, ``linear``)."""

    model_name: str
    method: str
    num_classes: int
    adapter: AdapterConfig | None = None
    modules: tuple[str, ...] = ()
    timm_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapter"] = self.adapter.to_dict() if self.adapter is not None else None
        d["modules"] = list(self.modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SDSConfig":
        """Parse a saved config; files of version 0.1 kept the adapter fields at top level."""
        adapter = d.get("adapter")
        if adapter is None and d.get("rank") is not None:
            adapter = {k: d[k] for k in ("rank", "alpha", "targets", "dropout", "rslora", "basis")
                       if k in d}
        return cls(model_name=d["model_name"], method=d["method"], num_classes=d["num_classes"],
                   adapter=AdapterConfig.from_dict(adapter) if adapter is not None else None,
                   modules=tuple(d.get("modules", ())), timm_kwargs=dict(d.get("timm_kwargs", {})))


def resolve_model_name(name: str) -> str:
    """Alias or timm name (with or without a pretrained tag) -> timm name; one-line error if
    unknown."""
    resolved = MODEL_ALIASES.get(name, name)
    if not timm.is_model(resolved.split(".")[0]):
        raise UserError(f"unknown model {name!r}: not an alias ({', '.join(MODEL_ALIASES)}) "
                         f"nor a timm model name")
    return resolved


def create_sds_model(name: str, *, num_classes: int, method: str = "sds_lora",
                     adapter: AdapterConfig | None = None, pretrained: bool = False,
                     checkpoint_path: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Create a timm model adapted for ``method``, with only the right parameters trainable.

    Args:
        name: alias (``vit_base``, ``swin_tiny``, ...; see ``MODEL_ALIASES``) or timm name.
        num_classes: classes of the new head (0 = no head).
        method: any entry of ``sds_vision.methods.METHODS``: a low-rank method (adapters +
            head train), ``full`` (everything) or ``linear`` (head only).
        adapter: adapter settings (``AdapterConfig``); ignored by ``full`` and ``linear``.
        pretrained: load pretrained weights, from ``checkpoint_path`` if given (.safetensors,
            .pth or Google .npz), else from an existing Hugging Face cache. Never downloads
            when ``HF_HUB_OFFLINE=1`` or the hub is unreachable: fails with a clear message.
        checkpoint_path: local weights file; implies ``pretrained=True``.
        **kwargs: ``AdapterConfig`` fields (``rank=8``, ``targets=["q", "v"]``, ...) override
            ``adapter``; the rest go to ``timm.create_model`` (``img_size``, ``drop_path_rate``).
    """
    spec = get_method(method)
    timm_name = resolve_model_name(name)
    adapter_kwargs, timm_kwargs = AdapterConfig.split_kwargs(kwargs)
    cfg = dataclasses.replace(adapter or AdapterConfig(), **adapter_kwargs) if spec.low_rank \
        else None
    model = _create_timm(timm_name, num_classes, pretrained or checkpoint_path is not None,
                         checkpoint_path, timm_kwargs)
    modules: list[str] = []
    if cfg is not None:
        modules = inject_adapters(model, method, cfg)
        plan = parse_targets(family_targets(model), cfg.targets)
        cfg = dataclasses.replace(cfg, targets=tuple(n for key, sl in plan.items()
                                                     for n in (sl or (key,))))
    set_trainable(model, method)
    model.sds_config = SDSConfig(model_name=timm_name, method=method, num_classes=num_classes,
                                 adapter=cfg, modules=tuple(modules), timm_kwargs=timm_kwargs)
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier (``model.get_classifier()``); empty without a head."""
    head = model.get_classifier()
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def set_trainable(model: nn.Module, method: str) -> None:
    """requires_grad: everything (full), head (linear), or adapters + head (low-rank)."""
    trains = get_method(method).trains
    for p in model.parameters():
        p.requires_grad_(trains == "all")
    for p in head_parameters(model):
        p.requires_grad_(True)
    for _, mod in adapter_modules(model):
        for _, p in adapter_parameters(mod):
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total``, ``trainable``, ``adapter`` (every adapter parameter),
    ``head``."""
    params = list(model.parameters())
    adapter = sum(p.numel() for _, m in adapter_modules(model) for _, p in adapter_parameters(m))
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "adapter": adapter, "head": sum(p.numel() for p in head_parameters(model))}


def _create_timm(timm_name: str, num_classes: int, pretrained: bool,
                 checkpoint_path, timm_kwargs: dict) -> nn.Module:
    try:
        return _create_timm_unchecked(timm_name, num_classes, pretrained, checkpoint_path,
                                      timm_kwargs)
    except TypeError as e:  # a model argument the architecture does not take (a user typo)
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"{timm_name}: {e} (check --timm-arg / --img-size / model arguments)") \
            from None


def _create_timm_unchecked(timm_name: str, num_classes: int, pretrained: bool,
                           checkpoint_path, timm_kwargs: dict) -> nn.Module:
    kwargs = dict(num_classes=num_classes, **timm_kwargs)
    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise UserError(f"checkpoint_path {str(path)!r} does not exist")
        overlay = dict(file=str(path))
        if path.suffix == ".npz":  # Google's original ViT checkpoints (VTAB's ViT-B_16.npz)
            overlay["custom_load"] = True
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs)
    if not _hub_weights_available(timm_name):
        raise UserError(
            f"no pretrained weights for {timm_name!r}: not in the Hugging Face cache "
            f"({_hf_cache_dir()}) and the hub is unreachable or HF_HUB_OFFLINE=1. Give a local "
            f"file with checkpoint_path=... (--checkpoint-path), or download it once on a "
            f"machine with network (HF_HOME=... python -c \"import timm; "
            f"timm.create_model('{timm_name}', pretrained=True)\") and copy the cache here")
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except OSError as e:  # LocalEntryNotFoundError and network errors
        raise UserError(f"could not load pretrained weights for {timm_name!r}: {e}. "
                           f"Give a local file with checkpoint_path=...") from None


def _hf_cache_dir() -> str:
    return constants.HF_HUB_CACHE


def _hub_weights_available(timm_name: str) -> bool:
    """True when the weights are in the HF cache, or the hub answers within 3 s."""
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

