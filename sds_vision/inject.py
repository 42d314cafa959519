"""Where adapters go: explicit per-family target tables, injection and merging.

One table per timm model class. A target name maps to a full-module-name pattern, so broad
names never over-match (``proj`` must not hit ``patch_embed.proj``, Swin's
``downsample.reduction`` and ConvNeXt's ``conv_dw`` are never touched). ``q``, ``k`` and ``v``
are output slices of the fused ``qkv`` projection (contiguous thirds of its rows).

Families that read ``qkv.weight`` directly (BEiT, EVA, SwinV2) would silently bypass a wrapper
around ``qkv``; they and every family without a table are refused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import AdapterConfig
from .errors import UserError
from .methods import get_method
from .methods.base import LowRankAdapter, adapter_modules

QKV_SLICES = ("q", "k", "v")


@dataclass(frozen=True)
class FamilyTargets:
    """Adapter targets of one timm model family: target name -> full module-name regex."""

    family: str
    patterns: dict[str, str]
    default: tuple[str, ...]


_VIT_BLOCK = r"blocks\.\d+"
_SWIN_BLOCK = r"layers\.\d+\.blocks\.\d+"
_CONVNEXT_BLOCK = r"stages\.\d+\.blocks\.\d+"

FAMILY_TARGETS: dict[type, FamilyTargets] = {
    VisionTransformer: FamilyTargets("vit", {
        "qkv": rf"{_VIT_BLOCK}\.attn\.qkv", "proj": rf"{_VIT_BLOCK}\.attn\.proj",
        "fc1": rf"{_VIT_BLOCK}\.mlp\.fc1", "fc2": rf"{_VIT_BLOCK}\.mlp\.fc2",
    }, default=("qkv", "proj", "fc1", "fc2")),
    SwinTransformer: FamilyTargets("swin", {
        "qkv": rf"{_SWIN_BLOCK}\.attn\.qkv", "proj": rf"{_SWIN_BLOCK}\.attn\.proj",
        "fc1": rf"{_SWIN_BLOCK}\.mlp\.fc1", "fc2": rf"{_SWIN_BLOCK}\.mlp\.fc2",
    }, default=("qkv", "proj", "fc1", "fc2")),
    ConvNeXt: FamilyTargets("convnext", {
        "fc1": rf"{_CONVNEXT_BLOCK}\.mlp\.fc1", "fc2": rf"{_CONVNEXT_BLOCK}\.mlp\.fc2",
    }, default=("fc1", "fc2")),
}

# Known to call F.linear(x, self.qkv.weight, ...) directly: a wrapper would never run.
_BYPASS_FAMILIES = ("Beit", "Eva", "SwinTransformerV2", "SwinTransformerV2Cr")


def family_targets(model: nn.Module) -> FamilyTargets:
    """The target table for ``model``'s class (exact class match), or a clear error."""
    cls = type(model)
    if cls in FAMILY_TARGETS:
        return FAMILY_TARGETS[cls]
    supported = ", ".join(c.__name__ for c in FAMILY_TARGETS)
    if cls.__name__ in _BYPASS_FAMILIES:
        raise UserError(
            f"unsupported family {cls.__name__}: it reads qkv.weight directly, so an adapter on "
            f"qkv would be silently bypassed; supported: {supported}")
    raise UserError(f"unsupported model family {cls.__name__}; supported: {supported}")


def parse_targets(table: FamilyTargets, targets: Sequence[str] | str | None
                  ) -> dict[str, tuple[str, ...] | None]:
    """Target names -> {table target: slices or None}. ``q``/``k``/``v`` = slices of ``qkv``."""
    names = table.default if targets is None else (
        [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets))
    if not names:
        raise UserError("targets: expected at least one target name")
    known = sorted(table.patterns) + (list(QKV_SLICES) if "qkv" in table.patterns else [])
    plan: dict[str, tuple[str, ...] | None] = {}
    slices: list[str] = []
    for name in names:
        base, _, sl = name.partition(".")
        if sl or base in QKV_SLICES:
            sl = sl or base
            base = base if sl != base else "qkv"
            if base != "qkv" or sl not in QKV_SLICES:
                raise UserError(f"targets: slice {name!r} is not valid; q/k/v slices apply only "
                                 f"to the fused qkv projection ('q' or 'qkv.q')")
            if base not in table.patterns:
                raise UserError(f"targets: {name!r} needs a fused qkv, which {table.family} "
                                 f"does not have; available: {known}")
            slices.append(sl)
        elif base not in table.patterns:
            raise UserError(f"targets: unknown target {name!r} for {table.family}; "
                             f"available: {known}")
        else:
            plan[base] = None
    if slices:
        if "qkv" in plan:
            raise UserError("targets: give either 'qkv' or its slices q/k/v, not both")
        plan["qkv"] = tuple(s for s in QKV_SLICES if s in slices)
    return plan


def inject_adapters(model: nn.Module, method: str, adapter: AdapterConfig | None = None,
                    **adapter_kwargs) -> list[str]:
    """Replace the target projections of ``model`` by the method's adapter layers, in place.

    Args:
        model: a timm ``VisionTransformer``, ``SwinTransformer`` (v1) or ``ConvNeXt``.
        method: a low-rank method of the registry (``sds_vision.methods.METHODS``).
        adapter: the adapter settings; keyword arguments (``rank=8, targets=["q", "v"]``,
            any ``AdapterConfig`` field) override its fields. ``targets`` names come from the
            family table (``qkv``, ``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2``); default:
            every projection the family has, in every block.

    Returns:
        Names of the replaced modules, in model order.
    """
    spec = get_method(method)
    if not spec.low_rank:
        raise UserError(f"method {method!r} has no adapters to inject")
    cfg = (adapter or AdapterConfig()).updated(**adapter_kwargs)
    layer_cls = spec.layer_class()
    table = family_targets(model)
    plan = parse_targets(table, cfg.targets)
    if any(True for _ in adapter_modules(model)):
        raise UserError("model already has adapters; inject into a fresh model")
    patterns = {t: re.compile(table.patterns[t]) for t in plan}
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        target = next((t for t, p in patterns.items() if p.fullmatch(name)), None)
        if target is None:
            continue
        if not isinstance(module, nn.Linear):
            raise UserError(f"{name} is a {type(module).__name__}, not nn.Linear "
                            f"(e.g. ConvNeXt with conv_mlp=True); this variant is not supported")
        slices = None
        if plan[target]:
            third = module.out_features // 3
            slices = [(QKV_SLICES.index(s) * third, (QKV_SLICES.index(s) + 1) * third)
                      for s in plan[target]]
        try:
            layer = layer_cls.from_config(module, cfg, slices)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
        model.set_submodule(name, layer)
        replaced.append(name)
    missing = [t for t, p in patterns.items() if not any(p.fullmatch(n) for n in replaced)]
    if missing:
        raise UserError(f"targets {missing} matched no module in {type(model).__name__}")
    return replaced


def merge_adapters(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (``merged_weight()``, float32) -> ``nn.Linear``.

    Returns a stock timm model with zero adapter overhead. With ``inplace=False`` (default)
    the adapted model is left untouched and a merged copy is returned.
    """
    merged = model if inplace else copy.deepcopy(model)
    for name, mod in list(adapter_modules(merged)):
        merged.set_submodule(name, _merged_linear(mod))
    if hasattr(merged, "sds_config"):
        del merged.sds_config
    return merged


def _merged_linear(mod: LowRankAdapter) -> nn.Linear:
    w = mod.weight
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                    device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(mod.merged_weight().to(w.dtype))
    if mod.bias is not None:
        lin.bias.data.copy_(mod.bias.detach())
    lin.weight.requires_grad_(w.requires_grad)
    return lin
