"""A new user's first hour: fast start, one-line errors, locked and nested run folders,
run lifecycle messages, augmentation recorded and printed."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.data
from clihelp import run_cli

from sds_vision import UserError, create_sds_model
from sds_vision.cli import build_parser, main
from sds_vision.models import check_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_vit", "--no-pretrained", "--img-size", "32", "--rank", "4",
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--threads", "1"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- start-up: the parser never loads torch ----------------------------------------------

def test_cli_import_and_parser_do_not_load_torch():
    code = ("import sys, sds_vision.cli as c; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'timm', 'albumentations', 'cv2', 'torchmetrics')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- argument errors: one line and a pointer to --help -----------------------------------

def test_argument_errors_are_one_line_plus_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--data", "d", "--lr"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == ("sds-vision finetune: error: argument --lr: expected one argument\n"
                   "see `sds-vision finetune --help`\n")
    with pytest.raises(SystemExit):
        main(["finetune", "--data", "d", "--aug", "heavy"])
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "invalid choice: 'heavy'" in err and "usage:" not in err


@pytest.mark.parametrize("value", ["-1e-3", "-2", "-.5", "-1E+2"])
def test_negative_numbers_are_values_and_checked(capsys, tmp_path, value):
    parsed = build_parser().parse_args(["finetune", "--data", "d", "--lr", value])
    assert parsed.lr == float(value)
    rc, _, err = run_cli(["finetune", "--data", tmp_path, "--out", tmp_path / "o",
                          "--lr", value], capsys)
    assert rc == 1 and err == f"sds-vision finetune: error: lr must be > 0 (got {float(value)})\n"


def test_subcommand_help_names_the_command_and_defaults(capsys):
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for name in ("evaluate", "predict", "export", "finetune", "demo"):
        assert subs[name].description, name
    assert "DataLoader worker processes, 0 = load in the main process (default: 2)" in \
        " ".join(subs["finetune"].format_help().split())
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert capsys.readouterr().out.startswith("usage: sds-vision validate")


# --- model / input size validated before anything is built or created -------------------

def test_img_size_not_a_multiple_of_the_patch_is_one_line_and_no_folder(shapes, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(["finetune", "--data", shapes, "--out", out, *TINY,
                          "--img-size", "33"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "img_size 33x33 (--img-size) is not a multiple of test_vit's patch size 16x16" in err
    assert not out.exists()


def test_family_before_arguments_and_cnn_img_size_sets_the_data_size(shapes, tmp_path, capsys):
    rc, _, err = run_cli(["finetune", "--data", shapes, "--out", tmp_path / "r", *TINY,
                          "--model", "resnet18", "--method", "sds_lora"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "unsupported model family ResNet; supported: VisionTransformer" in err
    assert not (tmp_path / "r").exists()
    # CNNs take any input size: --img-size only sets the data resolution, which they record
    assert check_model("resnet18", "linear", img_size=32) == "resnet18"
    assert check_model("test_convnext", "sds_lora", img_size=32) == "test_convnext"
    model = create_sds_model("test_convnext", num_classes=3, method="lora", img_size=40)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 40, 40)
    vit = create_sds_model("test_vit", num_classes=3, img_size=32)
    assert timm.data.resolve_model_data_config(vit)["input_size"] == (3, 32, 32)
    with pytest.raises(UserError, match=r"cannot take 8x8 inputs \(--img-size\)"):
        check_model("test_convnext", "lora", img_size=8)
    with pytest.raises(UserError, match=r"unexpected keyword argument 'foo'"):
        check_model("test_vit", "lora", timm_kwargs={"foo": 1})


# --- run folders: not inside the data, one writer at a time -----------------------------

@pytest.mark.parametrize("where", ["inside", "same", "contains"])
def test_out_and_data_must_not_nest(shapes, tmp_path, capsys, where):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    before = _tree(data)
    out, data_arg = {"inside": (data / "runs" / "r1", data), "same": (data, data),
                     "contains": (data.parent, data)}[where]
    rc, _, err = run_cli(["finetune", "--data", data_arg, "--out", out, *TINY], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert ("is inside --data" if where != "contains" else "is inside --out") in err
    assert _tree(data) == before and not (data / "runs").exists()


PAUSER = """
import os, sys, time
import sds_vision.train.engine as engine
save = engine.ckpt_io.save_checkpoint
paused, go = sys.argv[1], sys.argv[2]
def save_then_wait(path, state):
    save(path, state)
    if str(path).endswith("last.pt") and not os.path.exists(paused):
        open(paused, "w").close()   # the first checkpoint is on disk: hold the folder
        t0 = time.time()
        while not os.path.exists(go) and time.time() - t0 < 240:
            time.sleep(0.05)
engine.ckpt_io.save_checkpoint = save_then_wait
from sds_vision.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    import time
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, "the first run never reached its first checkpoint"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_process_on_the_same_out_fails_and_the_first_is_intact(shapes, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    args = ["finetune", "--data", shapes, "--epochs", "2", "--no-progress", *TINY,
            "--out", out]
    script, paused, go = tmp_path / "pauser.py", tmp_path / "paused", tmp_path / "go"
    script.write_text(PAUSER)
    first = subprocess.Popen([sys.executable, str(script), str(paused), str(go),
                              *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(paused, first)
        before = _tree(out)
        assert {"config.json", "classes.json", "data.json", "checkpoints/last.pt",
                ".lock"} <= set(before)
        for extra in (["--overwrite"], ["--resume"], ["--lr", "1e-2", "--overwrite"]):
            rc, _, err = run_cli([*args, *extra], capsys)
            assert rc == 1 and err.count("\n") == 1, err
            assert f"{out} is in use by another run (pid {first.pid} on " in err
            assert _tree(out) == before  # nothing touched, not even data.json
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert not (out / ".lock").exists()
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-3
    steps = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and json.loads(
        (out / "final_metrics.json").read_text())["steps"] == 8


# --- lifecycle: Ctrl-C says how to continue, resume says where it starts ------------------

INTERRUPTER = """
import os, signal, sys
import sds_vision.train.engine as engine
save = engine.ckpt_io.save_checkpoint
def save_then_interrupt(path, state):
    save(path, state)
    if str(path).endswith("last.pt"):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the first checkpoint
engine.ckpt_io.save_checkpoint = save_then_interrupt
from sds_vision.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_interrupt_resume_and_finished_run_messages(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--data", shapes, "--epochs", "2", "--save-every-steps", "3", *TINY,
            "--out", out]
    script = tmp_path / "interrupter.py"
    script.write_text(INTERRUPTER)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    # the first line: the augmentation; the second: model, method, params, data sizes
    assert lines[0].startswith("augmentation: light: resize shorter side to 33 (bicubic) -> "
                               "random crop 32x32 -> horizontal flip p=0.5 -> normalize")
    assert lines[1].startswith("test_vit / sds_lora: ") and "trainable of" in lines[1]
    assert "32 train / 16 val samples; 2 epochs x 4 steps of 8" in lines[1]
    assert lines[-1] == (f"sds-vision finetune: interrupted; to continue from the last "
                         f"checkpoint in {out}, run the same command plus --resume (same --out)")
    assert not (out / ".lock").exists()  # released on the way out

    rc, _, err = run_cli([*args, "--resume"], capsys)
    assert rc == 0, err
    assert f"resuming from epoch 1, step 3 ({out / 'checkpoints' / 'last.pt'})" in err
    config = (out / "config.json").read_bytes()
    assert json.loads(config)["resumed_from_step"] == 3
    data = json.loads((out / "data.json").read_text())
    assert data["aug"] == "light" and data["hflip"] and data["crop_scale"] is None
    assert data["pipeline"]["train"].startswith("resize shorter side to 33")
    assert data["pipeline"]["eval"].startswith("resize shorter side to 33 (bicubic) -> center")

    mtime = (out / "config.json").stat().st_mtime_ns
    rc, stdout, err = run_cli([*args, "--resume"], capsys)  # finished: nothing to do
    assert rc == 0 and "already finished; nothing to do" in stdout + err
    assert (out / "config.json").read_bytes() == config
    assert (out / "config.json").stat().st_mtime_ns == mtime
    rc, _, err = run_cli([*args, "--resume", "--aug", "strong"], capsys)
    assert rc == 1 and "different data settings" in err and "aug: 'light' -> 'strong'" in err


def test_interrupted_message_without_a_run():
    from sds_vision.cli import interrupted_message
    assert interrupted_message(None) == "sds-vision: interrupted"
    resumed = build_parser().parse_args(["finetune", "--data", "d", "--out", "o", "--resume"])
    assert interrupted_message(resumed).endswith("in o, run the same command (same --out)")



# --- one vocabulary: the sweep takes finetune's flag names --------------------------------

def test_sweep_workers_flag_and_dry_run_checks_weights(tmp_path, capsys):
    from benchmarks.vtab import run as sweep
    from benchmarks.vtab.tiny import make_tiny_vtab
    ap = sweep.build_parser()
    base = ["--data-root", "d", "--out", "o"]
    assert ap.parse_args([*base, "--workers", "3"]).num_workers == 3
    assert ap.parse_args([*base, "--num-workers", "2"]).num_workers == 2  # old spelling
    assert "--workers" in ap.format_help() and "--num-workers" not in ap.format_help()
    assert ap.parse_args(base).pretrained is True  # like finetune: --no-pretrained to opt out
    assert build_parser().parse_args(["finetune", "--data", "d"]).pretrained is True

    data = make_tiny_vtab(tmp_path / "data", {"dtd": 3}, sizes=(8, 2, 6))
    args = ["--data-root", str(data), "--out", str(tmp_path / "runs"), "--tasks", "dtd",
            "--methods", "lora", "--seeds", "0", "--model", "test_vit", "--dry-run",
            "--expect-sizes", "8", "2", "10", "--workers", "0"]
    assert sweep.main([*args, "--checkpoint-path", str(tmp_path / "nope.safetensors")]) == 2
    out = capsys.readouterr().out
    assert "would run dtd lora seed 0" in out
    assert f"weights: checkpoint_path '{tmp_path / 'nope.safetensors'}' does not exist" in out
    assert sweep.main(args) == 2  # HF_HUB_OFFLINE=1 (conftest) and an empty cache
    assert "weights: no pretrained weights for 'test_vit" in capsys.readouterr().out
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert sweep.main([*args, "--checkpoint-path", str(weights)]) == 0
    assert "weights: found" in capsys.readouterr().out
    assert sweep.main([*args, "--no-pretrained"]) == 0
    assert "weights:" not in capsys.readouterr().out


# --- the demo's loss plot: smoothed, raw kept ----------------------------------------------

def test_ema_smoothing_matches_reference_and_plot_keeps_raw(tmp_path, monkeypatch):
    from sds_vision import plotting
    from sds_vision.train import plots
    values = [4.0, 2.0, 3.0, 1.0]
    w = 0.5
    acc, ref = 0.0, []
    for i, v in enumerate(values, 1):  # debiased EMA, written out
        acc = w * acc + (1 - w) * v
        ref.append(acc / (1 - w ** i))
    assert plots.ema(values, w) == pytest.approx(ref)
    assert plots.ema(values, 0.0) == values and plots.ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)
    assert plots.smoothing_weight(5) == 0.0 and plots.smoothing_weight(50) == pytest.approx(0.9)
    assert plots.smoothing_weight(10_000) == 0.95

    drawn = []
    saved = plotting.save
    monkeypatch.setattr(plotting, "save", lambda fig, path: (drawn.append(fig), saved(fig, path)))
    pts = [(s, 2.0 + (-1) ** s) for s in range(1, 51)]  # a zig-zag around 2
    plots.plot_comparison({"t": {"lora": pts, "sds_lora": pts[:40]}}, tmp_path / "c.png")
    ax = drawn[0].axes[0]
    raw, smooth = ax.lines[0], ax.lines[1]
    assert list(raw.get_ydata()) == [p[1] for p in pts] and raw.get_alpha() < 0.5
    assert max(smooth.get_ydata()[10:]) - min(smooth.get_ydata()[10:]) < 0.5  # zig-zag damped
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lora", "sds_lora"]
    assert raw.get_color() == smooth.get_color() and (tmp_path / "c.png").stat().st_size > 5000
