"""CLI tests: finetune -> evaluate / predict / export, SIGKILL + --resume, one-line errors."""

import argparse
import csv
import io
import json
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import run_cli

from sds_vision.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_vit", "--no-pretrained", "--img-size", "32", "--rank", "4",
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--no-progress"]


def test_every_flag_has_help():
    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, sub in subs.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    finetune = subs.choices["finetune"].format_help()
    for flag in ("--img-size", "--batch-size", "--lr", "--seed", "--resume", "--overwrite",
                 "--pretrained", "--no-pretrained", "--checkpoint-path", "--aug", "--crop-scale",
                 "--no-aug", "--no-hflip", "--threads", "--skip-corrupt", "--val-ratio",
                 "--workers", "--targets", "--alpha", "--basis", "--label-smoothing",
                 "--warmup-epochs", "--weight-decay"):
        assert flag in finetune


def test_scripts_finetune_is_the_finetune_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "scripts" / "finetune.py"), run_name="__main__")
    assert e.value.code == 0 and "--checkpoint-path" in capsys.readouterr().out


def test_finetune_evaluate_predict_export(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, _ = run_cli(["finetune", "--data", shapes, "--method", "sds_lora", "--epochs", "2",
                          "--out", run, *TINY], capsys)
    assert rc == 0 and "val_top1" in out
    final = json.loads((run / "final_metrics.json").read_text())
    assert json.loads((run / "classes.json").read_text()) == ["circle", "cross", "square",
                                                              "triangle"]
    assert final["method"] == "sds_lora" and final["steps"] == 8

    rc, out, _ = run_cli(["evaluate", "--run", run], capsys)
    ev = json.loads(out)
    assert rc == 0 and ev["samples"] == 16 and ev["top1"] == final["val_top1"]
    assert ev["loss"] == pytest.approx(final["val_loss"], abs=1e-5)

    rc, out, _ = run_cli(["predict", "--run", run, "--top-k", "3", shapes / "val"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 16 and set(rows[0]) == {
        "path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"}
    correct = sum(Path(r["path"]).parent.name == r["label_1"] for r in rows)
    assert 100.0 * correct / 16 == pytest.approx(final["val_top1"])  # same model, same answer
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) >= float(r["prob_3"]) for r in rows)

    import timm

    from sds_vision.train.finetune import load_run_model
    rc, _, _ = run_cli(["export", "--run", run, "--out", tmp_path / "exp"], capsys)
    assert rc == 0
    meta = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert meta["num_classes"] == 4 and meta["label_names"][0] == "circle"
    plain = timm.create_model(**meta["timm_create_model_kwargs"]).eval()  # absolute file path
    adapted, _, _ = load_run_model(run)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), adapted(x), atol=1e-5, rtol=1e-5)
    fresh = timm.create_model("test_vit", num_classes=4, img_size=32).eval()
    assert not torch.allclose(fresh(x), adapted(x), atol=1e-3)
    from safetensors.torch import load_file
    fresh.load_state_dict(load_file(tmp_path / "exp" / "model.safetensors"))  # strict
    torch.testing.assert_close(fresh(x), adapted(x), atol=1e-5, rtol=1e-5)

    rc, _, _ = run_cli(["export", "--run", run, "--out", tmp_path / "peft", "--format", "peft"],
                       capsys)
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert rc == 0 and peft_cfg["r"] == 4 and peft_cfg["peft_type"] == "LORA"


KILLER = """
import os, signal, sys
import sds_vision.train.engine as engine
save = engine.ckpt_io.save_checkpoint
def save_then_die(path, state):
    save(path, state)
    if str(path).endswith("last.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # right after the first checkpoint
engine.ckpt_io.save_checkpoint = save_then_die
from sds_vision.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(shapes, tmp_path, capsys):
    # augmentation on, drop-path on, first checkpoint mid-epoch (step 3 of 4)
    args = ["finetune", "--data", shapes, "--method", "lora", "--epochs", "3", "--drop-path",
            "0.1", "--save-every-steps", "3", *TINY]
    rc, _, _ = run_cli([*args, "--out", tmp_path / "ref"], capsys)
    assert rc == 0
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, str(killer), *map(str, args), "--out", str(cut),
                           "--workers", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (cut / "checkpoints" / "last.pt").is_file()
    assert not (cut / "final_metrics.json").exists()
    assert torch.load(cut / "checkpoints/last.pt", weights_only=False)["step"] == 3
    rc, _, err = run_cli([*args, "--out", cut, "--resume"], capsys)
    assert rc == 0, err
    ref = json.loads((tmp_path / "ref" / "final_metrics.json").read_text())
    res = json.loads((cut / "final_metrics.json").read_text())
    for key in ("val_top1", "val_top5", "best_val_top1", "best_epoch", "steps", "epochs"):
        assert res[key] == ref[key], key
    for key in ("val_loss", "train_loss"):
        assert abs(res[key] - ref[key]) <= 1e-6, key
    ref_rows = (tmp_path / "ref" / "metrics.csv").read_text().splitlines()
    cut_rows = (cut / "metrics.csv").read_text().splitlines()
    # identical epochs apart from the wall-clock `seconds` column
    assert [r.rsplit(",", 1)[0] for r in cut_rows] == [r.rsplit(",", 1)[0] for r in ref_rows]

    # the finished run is protected; --resume with another config is refused
    rc, _, err = run_cli([*args, "--out", cut], capsys)
    assert rc == 1 and "finished run" in err and err.count("\n") == 1
    rc, _, err = run_cli([*args, "--out", cut, "--resume", "--lr", "1e-2"], capsys)
    assert rc == 1 and "different config" in err and "lr" in err and err.count("\n") == 1


def _bad_data(tmp_path, kind) -> Path:
    root = tmp_path / kind
    if kind == "missing":
        return root
    root.mkdir()
    if kind == "empty":
        return root
    for cls in ("a", "b"):
        (root / cls).mkdir()
    src = next((ROOT / "tests").glob("*.py"))  # any non-image file
    shutil.copy(src, root / "b" / "notes.txt")
    if kind == "corrupt":
        from PIL import Image
        for cls in ("a", "b"):
            for i in range(3):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
        (root / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("empty", "empty"),
    ("no_images", "class folder has no images"), ("corrupt", "corrupt")])
def test_bad_data_is_one_line_error(tmp_path, capsys, kind, message):
    rc, _, err = run_cli(["finetune", "--data", _bad_data(tmp_path, kind), "--epochs", "1",
                          "--out", tmp_path / "out", *TINY], capsys)
    assert rc == 1 and message in err and err.count("\n") == 1
    assert err.startswith("sds-vision finetune: error: ")


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "no_such_model", "unknown model"), ("--method", "nope", "unknown method")])
def test_unknown_model_or_method(shapes, tmp_path, capsys, flag, value, message):
    args = ["finetune", "--data", shapes, "--epochs", "1", "--out", tmp_path / "o", *TINY,
            flag, value]
    rc, _, err = run_cli(args, capsys)
    assert rc == 1 and message in err and err.count("\n") == 1


def test_non_finite_loss_exits_nonzero_with_one_line(shapes, tmp_path, capsys):
    rc, _, err = run_cli(["finetune", "--data", shapes, "--epochs", "2", "--out", tmp_path / "o",
                          *TINY, "--lr", "1e6", "--clip-grad", "0"], capsys)
    assert rc == 1 and "non-finite loss at step" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "final_metrics.json").exists()


def test_finetune_with_gradient_diagnostics(shapes, tmp_path, capsys):
    out = tmp_path / "diag"
    rc, _, _ = run_cli(["finetune", "--data", shapes, *TINY, "--epochs", "1", "--method",
                        "sds_lora", "--targets", "q,v,fc1", "--diagnostics-every", "2",
                        "--out", out], capsys)
    assert rc == 0 and (out / "diagnostics.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["step"] == 1]
    # one row per adapted layer (2 slices on qkv + fc1) per logged step: steps 1 and 2 of 4
    assert {r["step"] for r in rows} == {1, 2, 4}
    assert len(first) == 6 * 3
    # B = 0 at init: SDS-LoRA's first dA is exactly zero, dB is not (docs/method.md, section 2.6)
    assert all(r["erank_gA"] == 0.0 and r["erank_gB"] > 1.0 for r in first)


def test_validate_subcommand(tmp_path, capsys):
    from benchmarks.vtab.tiny import make_tiny_vtab
    make_tiny_vtab(tmp_path, ["kitti"])
    rc, out, _ = run_cli(["validate", tmp_path, "--tasks", "kitti", "--expect-sizes", "8", "2",
                          "10"], capsys)
    assert rc == 0 and "kitti" in out and "structured" in out
    (tmp_path / "kitti" / "val200.txt").unlink()
    rc, out, _ = run_cli(["validate", tmp_path, "--tasks", "kitti"], capsys)
    assert rc == 1 and "val200.txt" in out


def test_conflicting_or_rejected_flags_are_one_line_errors(shapes, tmp_path, capsys):
    rc, _, err = run_cli(["finetune", "--data", shapes, *TINY, "--epochs", "1", "--resume",
                          "--overwrite", "--out", tmp_path / "r"], capsys)
    assert rc == 1 and "--resume and --overwrite exclude each other" in err
    rc, _, err = run_cli(["finetune", "--data", shapes, *TINY, "--epochs", "1", "--timm-arg",
                          "foo=1", "--out", tmp_path / "t"], capsys)
    assert rc == 1 and "unexpected keyword argument 'foo'" in err and len(err.splitlines()) == 1
