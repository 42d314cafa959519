"""create_sds_model: aliases, methods and trainable sets, parameter counts, weight loading."""

import time

import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
from conftest import TINY
from safetensors.torch import save_file
from torch.testing import assert_close

from sds_vision import (
    MODEL_ALIASES,
    UserError,
    count_parameters,
    create_sds_model,
    resolve_model_name,
)


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
@pytest.mark.parametrize("method", ["sds_lora", "lora", "full", "linear"])
def test_methods_train_the_right_parameters(family, method):
    name, kwargs = TINY[family]
    model = create_sds_model(name, num_classes=7, method=method, rank=2, **kwargs)
    head = {f"{n}" for n, _ in model.get_classifier().named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["head"] == 7 * model.num_features + 7
    if method == "full":
        assert counts["trainable"] == counts["total"] and counts["adapter"] == 0
    elif method == "linear":
        assert len(trainable) == len(head) == 2 and counts["trainable"] == counts["head"]
    else:
        assert all(n.endswith(("lora_A", "lora_B")) or n.startswith("head") for n in trainable)
        assert counts["trainable"] == counts["adapter"] + counts["head"] > counts["head"]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()  # gradients reach every trainable parameter
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.sds_config.method == method


def test_adapter_count_formula_test_vit():
    model = create_sds_model("test_vit", num_classes=3, method="sds_lora", rank=4, img_size=32)
    # 6 blocks x r x [(64+192) qkv + (64+64) proj + (64+192) fc1 + (192+64) fc2]
    assert count_parameters(model)["adapter"] == 6 * 4 * (256 + 128 + 256 + 256) == 21_504
    assert model.sds_config.adapter.targets == ("qkv", "proj", "fc1", "fc2")
    qv = create_sds_model("test_vit", num_classes=3, method="lora", rank=4, targets=["v", "q"],
                          img_size=32)
    assert count_parameters(qv)["adapter"] == 6 * 2 * 4 * (64 + 64)
    assert qv.sds_config.adapter.targets == ("q", "v")


def test_aliases_map_to_in21k_tags():
    assert resolve_model_name("vit_base") == "vit_base_patch16_224.orig_in21k"
    assert resolve_model_name("swin_base") == "swin_base_patch4_window7_224.ms_in22k"
    assert resolve_model_name("convnext_base") == "convnext_base.fb_in22k"
    assert resolve_model_name("deit_small_patch16_224") == "deit_small_patch16_224"
    for alias in MODEL_ALIASES:
        name, _, tag = resolve_model_name(alias).partition(".")
        assert tag in timm.list_pretrained(f"{name}.{tag}")[0]
    model = create_sds_model("vit_base", num_classes=10, depth=1)
    assert model.pretrained_cfg["tag"] == "orig_in21k"
    assert model.sds_config.model_name == "vit_base_patch16_224.orig_in21k"


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="vit_huge_nonsense"), "unknown model 'vit_huge_nonsense'"),
    (dict(name="vit_gigantic"), "nor a timm model name"),
    (dict(method="adapter"), "unknown method 'adapter'; choose one of"),
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-3, method="lora"), "rank must be a positive int"),
    (dict(rank=1000), "rank must be an int in"),
    (dict(targets=["mlp"]), "unknown target 'mlp'"),
])
def test_bad_input(kwargs, match):
    args = {"name": "test_vit", "num_classes": 3, "img_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        create_sds_model(args.pop("name"), **args)


def test_pretrained_offline_without_weights_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"no pretrained weights for 'vit_base_patch16_224"
                                           r"\.orig_in21k'.*checkpoint_path"):
        create_sds_model("vit_base", num_classes=10, pretrained=True)
    assert time.perf_counter() - start < 5


def test_checkpoint_path_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.safetensors"):
        create_sds_model("test_vit", num_classes=3, checkpoint_path=tmp_path / "nope.safetensors")


def test_pretrained_from_local_file_replaces_head(tmp_path):
    source = timm.create_model("test_vit", num_classes=11, img_size=32)
    path = tmp_path / "source.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_sds_model("test_vit", num_classes=4, method="sds_lora", rank=2,
                             checkpoint_path=path, img_size=32).eval()
    assert_close(model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    assert model.head.weight.shape == (4, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # identical features at init: adapters start at zero
        assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                     source.eval().forward_head(source.forward_features(x), pre_logits=True))


def test_pretrained_from_hf_cache(tmp_path, monkeypatch):
    """An existing Hugging Face cache is used offline (the layout huggingface_hub writes)."""
    source = timm.create_model("test_vit", num_classes=1000)
    repo = tmp_path / "hub" / "models--timm--test_vit.r160_in1k"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file(source.state_dict(), str(snap / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = create_sds_model("test_vit", num_classes=5, method="linear", pretrained=True)
    assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
