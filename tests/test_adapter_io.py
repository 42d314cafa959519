"""Adapter files: save/load round trip, rebuild, refusals, peft export."""

import json

import pytest
import timm
import torch
from conftest import TINY, randomize_adapters
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from sds_vision import (
    UserError,
    create_sds_model,
    export_peft_adapter,
    load_adapter,
    load_sds_model,
    merge_adapters,
    save_adapter,
)

X = torch.randn(2, 3, 32, 32)


def _model(method="sds_lora", seed=0, family="vit", **kw):
    torch.manual_seed(seed)  # same seed -> same random "pretrained" backbone
    name, kwargs = TINY[family]
    model = create_sds_model(name, num_classes=5, method=method, rank=2, **{**kwargs, **kw})
    return model.eval()


def _train_a_bit(model):
    randomize_adapters(model)
    with torch.no_grad():
        model.get_classifier().weight.normal_()


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
@pytest.mark.parametrize("method", ["sds_lora", "lora", "linear"])
def test_round_trip_into_rebuilt_model(tmp_path, family, method):
    trained = _model(method, family=family, targets=["q", "v"] if family == "vit" else None)
    _train_a_bit(trained)
    save_adapter(trained, tmp_path / "adapter")
    rebuilt = _model(method, family=family, targets=["q", "v"] if family == "vit" else None)
    with torch.no_grad():
        assert (rebuilt(X) - trained(X)).abs().max() > 1e-3
        load_adapter(rebuilt, tmp_path / "adapter")
        assert_close(rebuilt(X), trained(X))
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    head = "base_model.model." + ("head" if family == "vit" else "head.fc")
    assert {f"{head}.weight", f"{head}.bias"} <= keys
    adapter_keys = keys - {f"{head}.weight", f"{head}.bias"}
    assert all(k.startswith("base_model.model.") and k.endswith(("lora_A.weight", "lora_B.weight"))
               for k in adapter_keys)
    assert len(adapter_keys) == (0 if method == "linear" else 2 * len(trained.sds_config.modules))
    cfg = json.loads((tmp_path / "adapter" / "sds_config.json").read_text())
    assert cfg["method"] == method and cfg["library_version"]
    assert not list((tmp_path / "adapter").glob("*.tmp"))


def test_load_sds_model_rebuilds_full_and_adapters(tmp_path):
    full = _model("full")
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(full, tmp_path / "full")
    with torch.no_grad():
        assert_close(load_sds_model(tmp_path / "full").eval()(X), full(X))
    sds = _model("sds_lora", seed=3)
    _train_a_bit(sds)
    save_adapter(sds, tmp_path / "sds")
    torch.manual_seed(3)
    again = load_sds_model(tmp_path / "sds").eval()
    assert again.sds_config == sds.sds_config
    with torch.no_grad():
        assert_close(again(X), sds(X))


def test_refuses_other_model_rank_or_shape(tmp_path):
    trained = _model()
    save_adapter(trained, tmp_path / "a")
    other_rank = create_sds_model("test_vit", num_classes=5, rank=4, img_size=32)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: adapter was made for rank=2"):
        load_adapter(other_rank, tmp_path / "a")
    other_model = create_sds_model("test_vit2", num_classes=5, rank=2, img_size=32)
    with pytest.raises(ValueError, match="made for model_name='test_vit'"):
        load_adapter(other_model, tmp_path / "a")
    other_method = _model("lora")
    with pytest.raises(ValueError, match="method='sds_lora', this model has method='lora'"):
        load_adapter(other_method, tmp_path / "a")
    other_classes = create_sds_model("test_vit", num_classes=9, rank=2, img_size=32)
    with pytest.raises(ValueError, match="num_classes=5"):
        load_adapter(other_classes, tmp_path / "a")
    # same shapes, another scale s (alpha / r vs alpha / sqrt(r)): the outputs would differ
    for kw in (dict(alpha=4.0), dict(rslora=True)):
        with pytest.raises(ValueError, match="made for scaling=1.0, this model has scaling="):
            load_adapter(_model(**kw), tmp_path / "a")
    load_adapter(_model(alpha=2.0), tmp_path / "a")  # alpha = r is the default: the same s
    # a tampered file: right config, wrong tensor shape
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.blocks.0.mlp.fc1.lora_A.weight"
    tensors[key] = torch.zeros(3, 64)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.lora_A.weight has shape \(3, 64\)"):
        load_adapter(_model(), tmp_path / "a")
    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="keys do not match"):
        load_adapter(_model(), tmp_path / "a")
    with pytest.raises(UserError, match="sds_config.json: not found"):
        load_adapter(_model(), tmp_path / "missing")


@pytest.mark.parametrize("targets", [None, ["q", "v"]])
def test_peft_export_round_trip(tmp_path, targets):
    peft = pytest.importorskip("peft")
    trained = _model("sds_lora", targets=targets)
    _train_a_bit(trained)
    export_peft_adapter(trained, tmp_path / "peft")
    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=5, img_size=32)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_close(peft_model(X), trained(X), rtol=1e-4, atol=1e-5)
        assert_close(merge_adapters(trained)(X), trained(X), rtol=1e-4, atol=1e-5)
        plain = timm.create_model("test_vit", num_classes=5, img_size=32).eval()
        assert (plain(X) - trained(X)).abs().max() > 1e-3


def test_peft_export_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="needs a low-rank method"):
        export_peft_adapter(_model("linear"), tmp_path)
