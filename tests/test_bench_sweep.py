"""End to end: tiny VTAB sweep (2 tasks x 2 methods x 1 seed, test_vit, img 32) -> report
with last and best columns, skip/resume, dry runs (protocol and parameter plan), runner
errors, FGVC folder names, a one-run FGVC sweep, and the SDS-LoRA paper suite."""

import csv
import json
import shutil
import statistics

import pytest

from benchmarks.vtab import run, run_fgvc
from benchmarks.vtab.protocol import PROTOCOLS, resolve
from benchmarks.vtab.tiny import make_tiny_fgvc, make_tiny_vtab
from benchmarks.vtab.tiny_sds_paper import make_tiny_sds_paper
from sds_vision.data.benchmarks import get_benchmark

COMMON = ["--seeds", "0", "--model", "test_vit", "--epochs", "1", "--img-size", "32",
          "--batch-size", "8", "--no-pretrained", "--num-workers", "0"]


def test_protocol_table():
    hp, src = resolve("vtab", "cifar", "lora")
    assert (hp["lr"], hp["weight_decay"], hp["batch_size"], hp["epochs"], hp["warmup_epochs"],
            hp["drop_path"]) == (1e-3, 1e-4, 64, 100, 10, 0.1)
    # the references' schedule, last batch and accumulation, each with its source
    assert (hp["sched"], hp["sched_per"], hp["warmup_lr"], hp["min_lr"], hp["warmup_prefix"],
            hp["drop_last"], hp["accum_steps"]) == ("cosine", "epoch", 1e-6, 1e-5, False, True, 1)
    assert "supernet_train_prompt.py" in src["drop_last"] and "NOAH" in src["sched_per"]
    assert resolve("vtab", "cifar", "full")[0]["lr"] == 1e-4
    hp, src = resolve("vtab", "dtd", "sds_lora", {"epochs": 2, "lr": None})
    assert hp["warmup_epochs"] == 1 and src["epochs"] == "command line"
    assert "capped" in src["warmup_epochs"]
    # FGVC: V-PETL's LoRA settings, lr per dataset; full keeps its own lr
    lrs = {t: resolve("fgvc", t, "lora")[0]["lr"] for t in get_benchmark("fgvc").tasks}
    assert lrs == {"cub": 1e-3, "nabirds": 2e-4, "oxford_flowers": 1e-3,
                   "stanford_dogs": 2.5e-4, "stanford_cars": 2e-3}
    hp, src = resolve("fgvc", "nabirds", "sds_lora")
    assert (hp["batch_size"], hp["weight_decay"], hp["drop_last"]) == (128, 5e-2, False)
    assert "run_vit_lora.sh" in src["lr"] and resolve("fgvc", "nabirds", "full")[0]["lr"] == 1e-4
    # the SDS-LoRA paper: epochs and lr per dataset, 64 x 4, linear decay per step
    paper = {t: (resolve("sds_paper", t, "lora")[0]["epochs"], resolve("sds_paper", t, "lora")[0]["lr"])
             for t in get_benchmark("sds_paper").tasks}
    assert paper == {"cifar100": (7, 1e-3), "resisc45": (10, 2e-3), "food101": (10, 2e-3),
                     "dtd": (25, 2e-3), "cub200": (25, 2e-3), "stanford_cars": (20, 5e-3),
                     "sun397": (15, 1e-3)}
    hp, _ = resolve("sds_paper", "dtd", "lora")
    assert (hp["batch_size"], hp["accum_steps"], hp["sched"], hp["sched_per"], hp["warmup_epochs"],
            hp["weight_decay"], hp["clip_grad"]) == (64, 4, "linear", "step", 0, 0.0, 1.0)
    for p in PROTOCOLS.values():  # every setting says where it comes from
        for t in get_benchmark(p.benchmark).tasks:
            for m in ("lora", "full"):
                values, sources = resolve(p.benchmark, t, m)
                assert set(values) == set(sources) and all(sources.values())


@pytest.mark.slow
def test_vtab_sweep_report_resume(tmp_path, capsys):
    data = make_tiny_vtab(tmp_path / "data", {"cifar": 5, "kitti": 4}, sizes=(8, 2, 6))
    out = tmp_path / "runs"
    argv = ["--data-root", str(data), "--tasks", "cifar", "kitti", "--methods", "lora",
            "linear", "--out", str(out), "--expect-sizes", "8", "2", "10", "--best", *COMMON]
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
            # the resolved protocol: schedule with warm-up start and floor, per-epoch
            # stepping, last batch, precision, placement, dropout; the best schedule
            sch = bench["schedule"]
            assert (sch["kind"], sch["stepped_per"], sch["floor_lr"], sch["warmup_prefix"]) == \
                ("cosine", "epoch", 1e-5, False)
            assert sch["warmup_epochs"] == 0 and "stepped per epoch" in sch["description"]
            assert bench["hparams"]["warmup_lr"] == 1e-6 and bench["hparams"]["drop_last"] is True
            assert bench["precision"] == "bf16" and bench["reference_precision"]["value"] == "fp32"
            assert bench["adapter"]["placement"] == "noah" and bench["adapter"]["dropout"] == 0.1
            assert bench["adapter"]["targets"] == ["qkv"] and bench["eval_every"] == 10
            assert bench["sources"]["drop_last"].startswith("NOAH")
            cfg = json.loads((d / "config.json").read_text())
            assert (cfg["drop_last"], cfg["sched_per"], cfg["warmup_prefix"]) == (True, "epoch", False)
            assert cfg["adapter"]["targets"] == ["qkv"] and cfg["steps_per_epoch"] == 1  # 10 // 8
            assert json.loads((d / "result.json").read_text())["val_top1"] == \
                finals[(task, m)]["val_top1"]
    md = (out / "report.md").read_text()
    assert "## Per-task accuracy, best epoch (selected on TEST)" in md
    assert "| LoRA | last epoch (ours) |" in md and "| LoRA | best epoch (selected on TEST) |" in md
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
    # a run that failed before its first checkpoint holds no result: new settings are taken
    shutil.rmtree(d / "checkpoints")
    assert run.main([*argv, "--tasks", "kitti", "--methods", "linear",
                     "--normalization", "inception"]) == 0
    assert json.loads((d / "bench.json").read_text())["preprocess"]["normalization"] == \
        "inception" and (d / "final_metrics.json").is_file()


def test_dry_run_and_errors(tmp_path, capsys):
    data = make_tiny_vtab(tmp_path / "data", {"dtd": 3}, sizes=(8, 2, 6))
    out = tmp_path / "runs"
    base = ["--data-root", str(data), "--out", str(out), *COMMON]
    assert run.main([*base, "--tasks", "dtd", "--dry-run", "--expect-sizes", "8", "2", "10",
                     "--methods", "sds_lora", "lora", "full", "linear"]) == 0
    log = capsys.readouterr().out
    assert "4 to run" in log and "would run dtd sds_lora seed 0" in log and not out.exists()
    assert "schedule: cosine to 1e-05, no warm-up" in log  # 1 epoch: warm-up capped at 0
    assert "drop_last True" in log and "precision bf16" in log
    assert "not shown: published numbers are for vit_base_patch16_224.orig_in21k" in log
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
    assert run.main(["--benchmark", "fgvc", "--data-root", str(fg), "--out", str(out),
                     "--tasks", "cub", "--expect-sizes", "8", "2", "10", *COMMON]) == 2
    assert "--expect-sizes applies to VTAB-1k only" in capsys.readouterr().err


def test_vit_base_dry_run_counts_the_anchor_placement(tmp_path, capsys):
    """ViT-B/16 at rank 8 with NOAH's placement: 294,912 adapter parameters, for LoRA and
    SDS-LoRA alike, counted without allocating weights (--no-pretrained)."""
    data = make_tiny_vtab(tmp_path / "data", {"dtd": 3}, sizes=(8, 2, 6))
    argv = ["--data-root", str(data), "--out", str(tmp_path / "runs"), "--tasks", "dtd",
            "--model", "vit_base", "--no-pretrained", "--dry-run", "--expect-sizes", "8", "2", "10"]
    assert run.main(argv) == 0
    log = capsys.readouterr().out
    for m in ("sds_lora", "lora"):
        line = next(ln for ln in log.splitlines() if ln.strip().startswith(m + " "))
        assert "294,912" in line.split("LoRA r=8")[0] and "LoRA r=8 (NOAH's run)" in line
        assert line.rstrip().endswith("294,912 (0.29M)")
    assert "adapter placement noah: one A (d->r) and one B (r->3d) on the fused qkv" in log
    assert "targets qkv, rank 8, dropout 0.1, scaling 1" in log
    assert "full fine-tuning: 85.8M" in log and "linear probing: 0.04M" in log
    assert "schedule: cosine to 1e-05, 10 warm-up epoch(s) from 1e-06, decay spans all " \
        "epochs, stepped per epoch" in log
    assert "NO steps: batch 64 > 10 train images" in log
    # V-PETL's placement: the same count, another function class
    assert run.main([*argv, "--placement", "vpetl"]) == 0
    log = capsys.readouterr().out
    assert "targets q,v, rank 8, dropout 0, scaling 1" in log
    assert "[its placement: noah]" in log and log.count("294,912") >= 4


def test_fgvc_folder_names_of_vpt_and_vpetl(tmp_path, capsys):
    names = ["StanfordCars", "StanfordDogs", "OxfordFlowers", "CUB_200_2011", "nabirds"]
    fg = make_tiny_fgvc(tmp_path / "fg", names)
    assert run.main(["--benchmark", "fgvc", "--data-root", str(fg), "--out", str(tmp_path / "r"),
                     "--dry-run", "--methods", "sds_lora", "lora", "full", "linear", *COMMON]) == 0
    log = capsys.readouterr().out
    assert "0 error(s)" in log and "plan: 20 runs (5 tasks x 4 methods x 1 seeds)" in log
    for t in ("cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"):
        assert f"would run {t} lora seed 0" in log
    assert "stanford_dogs: sds_lora, lora, linear: lr 0.00025, 1 epochs" in log  # V-PETL's lr


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
    assert bench["adapter"]["placement"] == "vpetl" and bench["adapter"]["targets"] == ["q", "v"]
    assert bench["hparams"]["lr"] == 2.5e-4 and bench["hparams"]["weight_decay"] == 5e-2
    assert "StanfordDogs --lr 2.5e-4" in bench["sources"]["lr"]
    md = (out / "report.md").read_text()
    assert "FGVC results" in md and "mean over 5 datasets" in md and "partial: 1/5" in md


@pytest.mark.slow
def test_sds_paper_sweep_resume_and_report(tmp_path, capsys):
    data = make_tiny_sds_paper(tmp_path / "suite", ["cifar100", "cub200"])
    out = tmp_path / "runs"
    argv = ["--benchmark", "sds_paper", "--data-root", str(data), "--tasks", "cifar100", "cub200",
            "--methods", "lora", "--out", str(out), "--seeds", "1", "--model", "test_vit",
            "--epochs", "1", "--img-size", "32", "--batch-size", "2", "--no-pretrained",
            "--num-workers", "0"]
    assert run.main(argv) == 0
    assert "[2/2] cub200" in capsys.readouterr().out
    d = out / "final" / "cifar100" / "lora" / "seed1"
    bench = json.loads((d / "bench.json").read_text())
    assert bench["hparams"]["accum_steps"] == 4 and bench["schedule"]["kind"] == "linear"
    assert bench["adapter"]["placement"] == "sds_paper" and bench["adapter"]["rslora"] is True
    assert bench["preprocess"]["normalization"] == "inception" and bench["eval_every"] == 0
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["steps_per_epoch"] == 1 and cfg["world_batch_size"] == 8   # 6 images: 3 x 2
    md = (out / "report.md").read_text()
    assert "# SDS-LoRA paper suite results (final: train -> test)" in md
    assert "mean over 7 datasets" in md and "best epoch" not in md
    # finished runs are skipped; an unfinished one resumes
    (d / "final_metrics.json").unlink()
    assert run.main(argv) == 0
    assert "1 finished (skipped), 1 to run" in capsys.readouterr().out
    assert (d / "final_metrics.json").is_file()
