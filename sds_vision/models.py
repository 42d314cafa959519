"""The front door: ``create_sds_model`` builds a timm backbone with adapters for a method."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import timm.data
import torch
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
            ``img_size`` is also recorded in ``model.pretrained_cfg["input_size"]``, so
            ``timm.data.resolve_model_data_config(model)`` gives the size the model was
            built for; architectures without that argument (CNNs) take any input size and
            only get the record.
    """
    spec = get_method(method)
    timm_name = resolve_model_name(name)
    adapter_kwargs, timm_kwargs = AdapterConfig.split_kwargs(kwargs)
    cfg = (adapter or AdapterConfig()).updated(**adapter_kwargs) if spec.low_rank \
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
    kwargs = timm_args(timm_name, timm_kwargs)
    try:
        model = _create_timm_unchecked(timm_name, num_classes, pretrained, checkpoint_path,
                                       kwargs)
    except TypeError as e:  # a model argument the architecture does not take (a user typo)
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"{timm_name}: {e} (check --timm-arg / model arguments)") from None
    _set_input_size(model, timm_kwargs.get("img_size"))
    return model


def timm_args(timm_name: str, timm_kwargs: dict) -> dict:
    """The ``timm.create_model`` arguments for ``timm_kwargs``: ``img_size`` is dropped for
    architectures without that argument (CNNs such as ResNet and ConvNeXt take any input
    size; there it only sets the data resolution, through ``pretrained_cfg``)."""
    if "img_size" not in timm_kwargs or takes_img_size(timm_name):
        return dict(timm_kwargs)
    return {k: v for k, v in timm_kwargs.items() if k != "img_size"}


def takes_img_size(timm_name: str) -> bool:
    """Whether the architecture's constructor has an ``img_size`` argument (ViT, Swin, ...)."""
    arch = timm_name.split(".")[0]
    if arch not in _TAKES_IMG_SIZE:
        try:
            with torch.device("meta"):  # no memory, no init cost
                timm.create_model(arch, pretrained=False, img_size=224)
            _TAKES_IMG_SIZE[arch] = True
        except TypeError as e:
            if "'img_size'" not in str(e):
                raise
            _TAKES_IMG_SIZE[arch] = False
    return _TAKES_IMG_SIZE[arch]


_TAKES_IMG_SIZE: dict[str, bool] = {}


def _set_input_size(model: nn.Module, img_size) -> None:
    """Record the input size the model was built for in its ``pretrained_cfg`` (timm keeps
    the registered one, e.g. 224, even for ``img_size=32``), so that
    ``timm.data.resolve_model_data_config(model)`` and exports give the trained size."""
    if not img_size:
        return
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, int(h), int(w))
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's older alias


def check_model(name: str, method: str, *, img_size: int | None = None,
                timm_kwargs: dict | None = None) -> str:
    """Everything about a model request that can fail, checked before any weights, data or
    folders: the name, the family (for low-rank methods), the model arguments and the
    input size (a forward pass on the meta device: no memory, no compute).

    Returns:
        The resolved timm name.

    Raises:
        UserError: one line naming the model and what is wrong with the request.
    """
    spec = get_method(method)
    timm_name = resolve_model_name(name)
    kwargs = dict(timm_kwargs or {})
    if img_size:
        kwargs["img_size"] = img_size
    if spec.low_rank:  # the family first: its message is the useful one for e.g. ResNet
        bare = _meta_model(timm_name, {})
        if bare is not None:
            family_targets(bare)
    model = _meta_model(timm_name, timm_args(timm_name, kwargs))
    if model is None:  # the architecture cannot be built on the meta device: no check
        return timm_name
    _set_input_size(model, img_size)
    _, h, w = timm.data.resolve_model_data_config(model)["input_size"]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if h % ph or w % pw:
            lo = max(ph, h // ph * ph)
            raise UserError(f"img_size {h}x{w} (--img-size) is not a multiple of {timm_name}'s "
                            f"patch size {ph}x{pw}; use e.g. {lo} or {lo + ph}")
    model.eval()
    try:
        with torch.no_grad():
            model(torch.empty(2, 3, h, w, device="meta"))
    except (AssertionError, ValueError, RuntimeError) as e:
        if "meta" not in str(e).lower():
            raise UserError(f"{timm_name} cannot take {h}x{w} inputs (--img-size): "
                            f"{' '.join(str(e).split())}") from None
    return timm_name


def _meta_model(timm_name: str, kwargs: dict) -> nn.Module | None:
    """The architecture on the meta device; None if it needs real tensors to initialise."""
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name.split(".")[0], pretrained=False, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"{timm_name}: {e} (check --timm-arg / model arguments)") from None
    except (AssertionError, ValueError, RuntimeError, NotImplementedError) as e:
        if "meta" in str(e).lower() or isinstance(e, NotImplementedError):
            return None
        raise UserError(f"{timm_name} cannot be built with {kwargs}: "
                        f"{' '.join(str(e).split())}") from None


def weights_problem(timm_name: str, checkpoint_path: str | os.PathLike | None = None
                    ) -> str | None:
    """Why pretrained weights for ``timm_name`` cannot be loaded here, or None if they can
    (a local file that exists, the Hugging Face cache, or a reachable hub)."""
    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            return f"checkpoint_path {str(checkpoint_path)!r} does not exist"
        return None
    if _hub_weights_available(timm_name):
        return None
    return (f"no pretrained weights for {timm_name!r}: not in the Hugging Face cache "
            f"({_hf_cache_dir()}) and the hub is unreachable or HF_HUB_OFFLINE=1. Give a local "
            f"file with checkpoint_path=... (--checkpoint-path), download it once on a "
            f"machine with network (HF_HOME=... python -c \"import timm; "
            f"timm.create_model('{timm_name}', pretrained=True)\") and copy the cache here, "
            f"or train from random weights (--no-pretrained)")


def _create_timm_unchecked(timm_name: str, num_classes: int, pretrained: bool,
                           checkpoint_path, timm_kwargs: dict) -> nn.Module:
    kwargs = dict(num_classes=num_classes, **timm_kwargs)
    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    problem = weights_problem(timm_name, checkpoint_path)
    if problem:
        raise UserError(problem)
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        overlay = dict(file=str(path))
        if path.suffix == ".npz":  # Google's original ViT checkpoints (VTAB's ViT-B_16.npz)
            overlay["custom_load"] = True
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **kwargs)
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

