"""End to end: tiny VTAB sweep (2 tasks x 2 methods x 1 seed, test_vit, img 32) -> report,
skip/resume, dry run, runner errors, and a one-run FGVC sweep."""

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vtab import run, run_fgvc
from benchmarks.vtab.protocol import hparams
from benchmarks.vtab.tiny import make_tiny_fgvc, make_tiny_vtab

COMMON = ["--seeds", "0", "--model", "test_vit", "--epochs", "1", "--img-size", "32",
          "--batch-size", "8", "--no-pretrained", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_protocol_table():
    hp = hparams("vtab", "cifar", "lora")
    assert (hp["lr"], hp["weight_decay"], hp["batch_size"], hp["epochs"], hp["warmup_epochs"],
            hp["drop_path"]) == (1e-3, 1e-4, 64, 100, 10, 0.1)
    assert hparams("vtab", "cifar", "full")["lr"] == 1e-4
    assert hparams("vtab", "dtd", "sds_lora", {"epochs": 2, "lr": None})["warmup_epochs"] == 1


@pytest.mark.slow
def test_vtab_sweep_report_resume(tmp_path, capsys):
    data = make_tiny_vtab(tmp_path / "data", {"cifar": 5, "kitti": 4}, sizes=(8, 2, 6))
    out = tmp_path / "runs"
    argv = ["--data-root", str(data), "--tasks", "cifar", "kitti", "--methods", "lora",
            "linear", "--out", str(out), "--expect-sizes", "8", "2", "10", *COMMON]
    assert run.main(argv) == 0
    log = capsys.readouterr().out
    assert "0 finished (skipped), 4 to run" in log
    assert "[4/4] kitti" in log and "0 left" in log and "top1" in log
    finals = {}
    for task in ("cifar", "kitti"):
        for m in ("lora", "linear"):
            d = out / "final" / task / m / "seed0"
            finals[(task, m)] = json.loads((d / "final_metrics.json").read_text())
            bench = json.loads((d / "bench.json").read_text())
            assert bench["mode"] == "final" and bench["eval_split"] == "test"
            assert bench["preprocess"]["normalization"] == "imagenet"
            assert bench["hparams"]["epochs"] == 1 and bench["backbone"] == "test_vit"
            assert json.loads((d / "result.json").read_text())["val_top1"] == \
                finals[(task, m)]["val_top1"]
    # report averages recomputed from the per-task numbers the engine wrote
    summ = {(r["method"], r["average"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    for m in ("lora", "linear"):
        expect = statistics.fmean(finals[(t, m)]["val_top1"] for t in ("cifar", "kitti"))
        assert float(summ[(m, "mean_over_all_tasks")]["value"]) == pytest.approx(expect, abs=1e-3)
        # cifar is natural, kitti structured: mean of group means == mean of the two here
        assert float(summ[(m, "mean_of_group_means")]["value"]) == pytest.approx(expect, abs=1e-3)
        assert summ[(m, "mean_over_all_tasks")]["partial"] == "True"
    md = (out / "report.md").read_text()
    assert "Only 2 of 19 tasks ran" in md and (out / "chart_structured.png").is_file()

    # re-run: everything finished -> skipped, files untouched
    stamp = (out / "final/cifar/lora/seed0/final_metrics.json").stat().st_mtime_ns
    assert run.main(argv) == 0
    assert "4 finished (skipped), 0 to run" in capsys.readouterr().out
    assert (out / "final/cifar/lora/seed0/final_metrics.json").stat().st_mtime_ns == stamp

    # an unfinished run (checkpoint, no final_metrics.json) is resumed, not restarted
    d = out / "final/kitti/linear/seed0"
    (d / "final_metrics.json").unlink()
    assert run.main(argv) == 0
    log = capsys.readouterr().out
    assert "3 finished (skipped), 1 to run" in log and "[1/1] kitti" in log
    again = json.loads((d / "final_metrics.json").read_text())
    assert again["val_top1"] == finals[("kitti", "linear")]["val_top1"]
    assert json.loads((d / "config.json").read_text())["resumed_from_step"] == again["steps"]

    # a finished run made with other settings is refused, not counted as done
    assert run.main([*argv, "--epochs", "3"]) == 2
    assert "made with different settings (hparams)" in capsys.readouterr().err
    # an unfinished run dir started with other settings is refused (not silently mixed)
    (d / "final_metrics.json").unlink()
    assert run.main([*argv, "--normalization", "inception"]) == 2
    assert "made with different settings (preprocess)" in capsys.readouterr().err
    # tune runs live beside final runs, never in the same folders
    assert run.main([*argv, "--mode", "tune", "--tasks", "kitti", "--methods", "lora"]) == 0
    assert (out / "tune/kitti/lora/seed0/final_metrics.json").is_file()
    assert (d / "bench.json").is_file() and not (d / "final_metrics.json").exists()


def test_dry_run_and_errors(tmp_path, capsys):
    data = make_tiny_vtab(tmp_path / "data", {"dtd": 3}, sizes=(8, 2, 6))
    out = tmp_path / "runs"
    base = ["--data-root", str(data), "--out", str(out), *COMMON]
    assert run.main([*base, "--tasks", "dtd", "--dry-run", "--expect-sizes", "8", "2", "10"]) == 0
    log = capsys.readouterr().out
    n_methods = len(run.METHODS)  # default --methods: every method of the registry
    assert f"{n_methods} to run" in log and "would run dtd sds_lora seed 0" in log \
        and not out.exists()
    assert run.main([*base, "--tasks", "dtd", "--dry-run"]) == 2             # default 800/200/1000
    assert "train800.txt: 8 examples, expected 800 (and 2 more" in capsys.readouterr().err
    assert run.main([*base, "--tasks", "dtd", "imagenet"]) == 2
    assert "unknown VTAB task 'imagenet'" in capsys.readouterr().err
    assert run.main([*base, "--tasks", "eurosat", "--expect-sizes", "8", "2", "10"]) == 2
    assert "task folder missing for 'eurosat'" in capsys.readouterr().err
    fg = make_tiny_fgvc(tmp_path / "fg", ["cub"])
    assert run.main(["--data-root", str(fg), "--out", str(out), "--tasks", "cub", *COMMON]) == 2
    assert "unknown VTAB task 'cub'" in capsys.readouterr().err
    assert run.main(["--data-root", str(fg), "--out", str(out), "--tasks", "dtd", *COMMON]) == 2
    assert "looks like an FGVC root" in capsys.readouterr().err


@pytest.mark.slow
def test_fgvc_sweep(tmp_path, capsys):
    fg = make_tiny_fgvc(tmp_path / "fg", {"stanford_dogs": 3}, sizes=(6, 3, 4), image_size=20)
    out = tmp_path / "runs"
    assert run_fgvc.main(["--data-root", str(fg), "--tasks", "dogs", "--methods", "lora",
                          "--out", str(out), *COMMON]) == 0
    log = capsys.readouterr().out
    assert "[1/1] stanford_dogs" in log
    bench = json.loads((out / "final/stanford_dogs/lora/seed0/bench.json").read_text())
    assert bench["benchmark"] == "fgvc" and bench["train_split"] == "train"
    assert bench["preprocess"]["augment"] is True and bench["preprocess"]["resize"] == 37
    md = (out / "report.md").read_text()
    assert "FGVC results" in md and "mean over 5 datasets" in md and "partial: 1/5" in md
