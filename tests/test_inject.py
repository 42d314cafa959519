"""Injection per family, merging, and the refusals (unsupported families, bad targets)."""

import copy
import re

import pytest
import timm
import torch
from conftest import TINY, randomize_adapters, unit_layer_scale
from torch import nn
from torch.testing import assert_close

from sds_vision import LoRALinear, SDSLoRALinear, adapter_modules, inject_adapters, merge_adapters

EXPECTED = {  # every projection of every block, from the model's own structure
    "vit": lambda m: [f"blocks.{i}.{t}" for i in range(len(m.blocks))
                      for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    "swin": lambda m: [f"layers.{s}.blocks.{b}.{t}" for s, layer in enumerate(m.layers)
                       for b in range(len(layer.blocks))
                       for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    "convnext": lambda m: [f"stages.{s}.blocks.{b}.{t}" for s, st in enumerate(m.stages)
                           for b in range(len(st.blocks)) for t in ("mlp.fc1", "mlp.fc2")],
}


def _tiny(family, **kw):
    name, kwargs = TINY[family]
    model = timm.create_model(name, num_classes=5, **{**kwargs, **kw}).eval()
    unit_layer_scale(model)
    return model


def _images(model, n=2):
    return torch.randn(n, *model.pretrained_cfg["input_size"][:1], *_hw(model))


def _hw(model):
    size = getattr(model.patch_embed, "img_size", None) if hasattr(model, "patch_embed") else None
    return tuple(size) if size else (32, 32)


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
@pytest.mark.parametrize("method", ["sds_lora", "lora"])
def test_every_target_of_every_block(family, method):
    model = _tiny(family)
    base = copy.deepcopy(model)
    x = _images(model)
    replaced = inject_adapters(model, method, rank=2, alpha=4)
    assert replaced == EXPECTED[family](base)
    cls = SDSLoRALinear if method == "sds_lora" else LoRALinear
    assert all(type(model.get_submodule(n)) is cls for n in replaced)
    assert [n for n, _ in adapter_modules(model)] == replaced
    with torch.no_grad():
        assert_close(model(x), base(x))  # identity at init (B = 0)
        randomize_adapters(model)
        assert (model(x) - base(x)).abs().max() > 1e-3
    # base parameters keep their names: a plain timm state dict loads strictly
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all(re.search(r"lora_[AB]$", k) for k in missing)


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_merge_equals_adapted_and_differs_from_base(family):
    model = _tiny(family)
    base = copy.deepcopy(model)
    inject_adapters(model, "sds_lora", rank=2, alpha=4)
    randomize_adapters(model)
    x = _images(model)
    merged = merge_adapters(model)
    assert not any(True for _ in adapter_modules(merged))
    assert any(True for _ in adapter_modules(model))  # not in place by default
    with torch.no_grad():
        assert_close(merged(x), model(x), rtol=1e-4, atol=1e-5)
        assert (merged(x) - base(x)).abs().max() > 1e-3
    fresh = timm.create_model(TINY[family][0], num_classes=5, **TINY[family][1])
    fresh.load_state_dict(merged.state_dict(), strict=True)  # a stock timm model again
    assert type(merged) is type(base)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("qkv"))
    merge_adapters(model, inplace=True)
    assert not any(True for _ in adapter_modules(model))


def test_qv_slices_on_fused_qkv():
    model = _tiny("vit")
    base = copy.deepcopy(model)
    replaced = inject_adapters(model, "lora", rank=3, targets=["q", "v"])
    assert replaced == [f"blocks.{i}.attn.qkv" for i in range(len(model.blocks))]
    qkv = model.blocks[0].attn.qkv
    d = qkv.in_features
    assert qkv.slices == [(0, d), (2 * d, 3 * d)]
    randomize_adapters(model)
    delta = qkv.delta_weight()
    assert torch.equal(delta[d:2 * d], torch.zeros(d, d))  # k rows exactly zero
    assert (delta[:d].abs() > 0).all() and (delta[2 * d:].abs() > 0).all()
    x = _images(model)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-3
        assert_close(merge_adapters(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_slice_order_and_spelling():
    model = _tiny("vit")
    inject_adapters(model, "sds_lora", rank=2, targets="qkv.v, q, fc1")
    assert model.blocks[0].attn.qkv.slices[0][0] == 0
    assert isinstance(model.blocks[0].mlp.fc1, SDSLoRALinear)
    assert isinstance(model.blocks[0].attn.proj, nn.Linear)


def test_param_count_formula_vit_base_q_v():
    # LoRA r=8 on q and v of ViT-B/16: 12 blocks x 2 slices x r x (768 + 768) = 294,912
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=0)
    inject_adapters(model, "lora", rank=8, targets=["q", "v"])
    n = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in adapter_modules(model))
    assert n == 12 * 2 * 8 * (768 + 768) == 294_912


@pytest.mark.parametrize("name,kwargs,match", [
    ("beit_base_patch16_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=32),
     "Beit: it reads qkv.weight directly"),
    ("eva02_tiny_patch14_224", dict(depth=1, embed_dim=32, num_heads=2, img_size=28),
     "Eva: it reads qkv.weight directly"),
    ("swinv2_tiny_window8_256", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                     img_size=64, window_size=4), "SwinTransformerV2: it reads"),
    ("test_resnet", {}, "unsupported model family ResNet"),
    ("deit_tiny_distilled_patch16_224", dict(depth=1, img_size=32),
     "unsupported model family VisionTransformerDistilled"),
    ("test_convnext", dict(conv_mlp=True), r"stages.0.blocks.0.mlp.fc1 is a Conv2d"),
])
def test_refused_families(name, kwargs, match):
    model = timm.create_model(name, **kwargs)
    with pytest.raises(ValueError, match=match):
        inject_adapters(model, "sds_lora", rank=2)


@pytest.mark.parametrize("family,kwargs,match", [
    ("vit", dict(targets=["attn"]), "unknown target 'attn' for vit"),
    ("vit", dict(targets=["proj.q"]), "slice 'proj.q' is not valid"),
    ("vit", dict(targets=["fc1.v"]), "slice 'fc1.v' is not valid"),
    ("vit", dict(targets=["qkv", "q"]), "either 'qkv' or its slices"),
    ("vit", dict(targets=[]), "at least one target"),
    ("convnext", dict(targets=["q"]), "needs a fused qkv, which convnext does not have"),
    ("convnext", dict(targets=["qkv"]), "unknown target 'qkv' for convnext"),
    ("vit", dict(rank=0), "rank must be a positive integer, got 0"),
    ("vit", dict(rank=65), r"rank must be an int in \[1, 64\]"),
    ("vit", dict(method="nope"), "unknown method 'nope'; choose one of"),
])
def test_bad_targets_and_arguments(family, kwargs, match):
    model = _tiny(family)
    args = {"method": "sds_lora", "rank": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        inject_adapters(model, args.pop("method"), **args)


def test_zero_matches_is_an_error():
    model = _tiny("vit")
    model.blocks = nn.Sequential()  # no blocks left: nothing to adapt
    with pytest.raises(ValueError, match="matched no module"):
        inject_adapters(model, "lora", rank=2)


def test_double_injection_is_refused():
    model = _tiny("vit")
    inject_adapters(model, "lora", rank=2)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, "lora", rank=2)


def test_unknown_adapter_option_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown adapter option rnak; the options are rank, "):
        inject_adapters(_tiny("vit"), "lora", rnak=2)
