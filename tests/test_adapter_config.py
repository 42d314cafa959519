"""One place per adapter option: AdapterConfig -> CLI flags -> TrainConfig -> model -> files."""

import dataclasses
import json

import pytest
import torch

from sds_vision import AdapterConfig, UserError, adapter_modules, load_sds_model
from sds_vision.cli import build_parser, main
from sds_vision.data import generate_task
from sds_vision.train import TrainConfig


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be a positive integer, got 0"),
    (dict(rank=2.5), "rank must be a positive integer"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(alpha=-1.0), "alpha must be > 0"),
    (dict(basis="svd"), "basis must be one of polar, qr, got 'svd'"),
])
def test_bad_adapter_settings_are_one_line_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        AdapterConfig(**kwargs)


def test_targets_normalise_and_configs_round_trip():
    a = AdapterConfig(targets="q, v")
    assert a.targets == ("q", "v") and AdapterConfig.from_dict(a.to_dict()) == a
    cfg = TrainConfig(method="lora", adapter=a, precision="fp32", accum_steps=2)
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.adapter == a
    # a config.json of version 0.1 (adapter fields at top level, amp flag) still reads
    old = TrainConfig.from_dict({"method": "lora", "rank": 4, "basis": "qr", "amp": False})
    assert old.adapter == AdapterConfig(rank=4, basis="qr") and old.precision == "fp32"


def test_every_adapter_field_is_a_cli_flag_with_its_default():
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    actions = {a.dest: a for a in finetune._actions}
    for f in dataclasses.fields(AdapterConfig):
        assert f.name in actions, f.name
        assert actions[f.name].default == f.default, f.name
        assert "(default: %(default)s)" in actions[f.name].help


def test_dropout_and_rslora_flow_from_the_cli_to_the_adapter_file(tmp_path, capsys):
    root = tmp_path / "data"
    generate_task(root, "shapes", 4, 32, 0, "train")
    generate_task(root, "shapes", 2, 32, 0, "val")
    out = tmp_path / "run"
    rc = main(["finetune", "--data", str(root / "shapes"), "--model", "test_vit", "--img-size",
               "32", "--no-pretrained", "--method", "lora", "--rank", "4", "--alpha", "8",
               "--dropout", "0.1",
               "--rslora", "--targets", "q,v", "--epochs", "1", "--batch-size", "8", "--workers",
               "0", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((out / "adapter" / "sds_config.json").read_text())
    expect = {"rank": 4, "alpha": 8.0, "targets": ["q", "v"], "dropout": 0.1, "rslora": True}
    assert {k: saved["adapter"][k] for k in expect} == expect
    assert set(saved["adapter"]) == {f.name for f in dataclasses.fields(AdapterConfig)}
    assert json.loads((out / "config.json").read_text())["adapter"]["dropout"] == 0.1

    torch.manual_seed(0)  # the run's backbone is random init with seed 0: rebuilt identically
    model = load_sds_model(out / "adapter", img_size=32).eval()
    layers = [m for _, m in adapter_modules(model)]
    assert layers and all(m.scaling == pytest.approx(8 / 4 ** 0.5) for m in layers)
    assert all(isinstance(m.dropout, torch.nn.Dropout) and m.dropout.p == 0.1 for m in layers)
    assert all(m.slices == [(0, 64), (128, 192)] for m in layers)
    assert any(m.lora_B.abs().max() > 0 for m in layers)  # trained factors were loaded
