"""Report averaging on hand-written final_metrics.json files (means computed by hand)."""

import csv
import json
import math

import pytest

from benchmarks.vtab.anchors import ANCHOR_BACKBONE
from benchmarks.vtab.report import main, summarise, write_report
from benchmarks.vtab.rundir import load_results, run_dir
from sds_vision.data.vtab import VTAB_TASKS


def _run(root, task, method, seed, top1, best=None, mode="final", trainable=1_000, head=100,
         bench=True, benchmark="vtab", eval_every=10, backbone="test_vit", placement="noah"):
    d = run_dir(root, mode, task, method, seed)
    d.mkdir(parents=True)
    fm = {"val_top1": top1, "best_val_top1": best if best is not None else top1,
          "params": {"total": 5000, "trainable": trainable, "adapter": trainable - head,
                     "head": head}, "model": "test_vit", "method": method, "seconds": 1.0}
    (d / "final_metrics.json").write_text(json.dumps(fm))
    if bench:
        (d / "bench.json").write_text(json.dumps(
            {"benchmark": benchmark, "task": task, "method": method, "seed": seed, "mode": mode,
             "backbone": backbone, "preprocess": {"normalization": "imagenet"},
             "adapter": {"placement": placement}, "precision": "bf16",
             "eval_every": eval_every}))


@pytest.fixture
def partial_runs(tmp_path):
    # lora: 4 tasks x 2 seeds; full: cifar only, 1 seed
    for task, vals in {"cifar": (70, 72), "dtd": (60, 62), "eurosat": (90, 94),
                       "kitti": (50, 50)}.items():
        for seed, v in enumerate(vals):
            _run(tmp_path, task, "lora", seed, v, best=v + 5)
    _run(tmp_path, "cifar", "full", 0, 80.0, trainable=2_000_000, head=100)
    return tmp_path


def test_partial_averages_by_hand(partial_runs):
    s = summarise(load_results(partial_runs))
    c = s.cells[("cifar", "lora")]
    assert c.mean == 71 and math.isclose(c.std, math.sqrt(2))
    assert s.group_means["last"]["lora"]["natural"] == (66.0, 2, 7)       # (71 + 61) / 2
    assert s.group_means["last"]["lora"]["specialized"] == (92.0, 1, 4)
    assert s.group_means["last"]["lora"]["structured"] == (50.0, 1, 8)
    mog, k, n = s.mean_of_groups["last"]["lora"]
    assert math.isclose(mog, (66 + 92 + 50) / 3) and (k, n) == (3, 3)
    assert s.mean_all["last"]["lora"] == (68.5, 4, 19)                     # (71+61+92+50) / 4
    assert s.mean_all["best"]["lora"] == (73.5, 4, 19)                     # best = last + 5
    assert s.mean_of_groups["last"]["full"] == (80.0, 1, 3)
    assert s.cells[("cifar", "full")].std is None                  # one seed: undefined


def test_full_19_tasks_both_averages(tmp_path):
    for i, t in enumerate(VTAB_TASKS):                             # task i scores i
        _run(tmp_path, t, "sds_lora", 0, float(i))
    s = summarise(load_results(tmp_path))
    # natural 0..6 -> 3, specialized 7..10 -> 8.5, structured 11..18 -> 14.5
    assert [s.group_means["last"]["sds_lora"][g][0] for g in ("natural", "specialized",
                                                              "structured")] == [3, 8.5, 14.5]
    assert math.isclose(s.mean_of_groups["last"]["sds_lora"][0], 26 / 3)
    assert s.mean_all["last"]["sds_lora"] == (9.0, 19, 19)
    paths = write_report(tmp_path)
    md = paths["report.md"].read_text()
    assert "8.67" in md and "9.00" in md and "partial" not in md


def test_report_files_and_labels(partial_runs, capsys):
    assert main([str(partial_runs), "--anchors", "--best"]) == 0
    md = (partial_runs / "report.md").read_text()
    assert "mean of group means" in md and "mean over 19 tasks" in md
    assert "69.33 (partial: 3/3 groups, 4/19 tasks)" in md and "68.50 (partial: 4/19 tasks)" in md
    assert "Only 4 of 19 tasks ran" in md
    assert "71.00 ± 1.41 (n=2)" in md and "80.00 ± – (n=1)" in md
    assert "selected on TEST" in md and "76.00" in md              # best = last + 5
    assert "| LoRA | best epoch (selected on TEST) | 71.00" in md     # natural: (76 + 66) / 2
    assert "74.33 (partial: 3/3 groups, 4/19 tasks)" in md and "73.50 (partial: 4/19 tasks)" in md
    assert "THEIRS" in md and "68.97" in md                        # full fine-tuning anchor
    assert "LAST epoch" in md
    rows = list(csv.DictReader(open(partial_runs / "report.csv")))
    assert len(rows) == 5
    r = next(r for r in rows if r["task"] == "eurosat")
    assert float(r["mean_top1"]) == 92 and r["seeds"] == "0 1" and r["group"] == "specialized"
    summ = list(csv.DictReader(open(partial_runs / "summary.csv")))
    mog = next(r for r in summ if r["method"] == "lora" and r["average"] == "mean_of_group_means"
               and r["epoch"] == "last")
    assert math.isclose(float(mog["value"]), 69.3333, abs_tol=1e-3) and mog["partial"] == "True"
    best = next(r for r in summ if r["method"] == "lora" and r["average"] == "mean_over_all_tasks"
                and r["epoch"] == "best")
    assert float(best["value"]) == 73.5
    for g in ("natural", "specialized", "structured"):
        assert (partial_runs / f"chart_{g}.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_a_mode_without_runs_leaves_the_report_alone(partial_runs):
    write_report(partial_runs)
    before = (partial_runs / "report.md").read_text()
    with pytest.raises(ValueError, match="no finished runs in split mode 'tune'"):
        write_report(partial_runs, mode="tune")
    assert (partial_runs / "report.md").read_text() == before


def test_params_column(partial_runs):
    md = (write_report(partial_runs)["report.md"]).read_text()
    assert "| full fine-tuning | last epoch (ours) | 80.00 (partial: 1/7 tasks)" in md
    assert "2.000 | 2.000" in md                                   # 2M trainable, 100 head


def test_path_fallback_without_bench_json(tmp_path):
    _run(tmp_path, "dtd", "linear", 3, 40.0, bench=False)
    (r,) = load_results(tmp_path)
    assert (r.task, r.method, r.seed, r.mode) == ("dtd", "linear", 3, "final")


def test_bad_inputs(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    _run(tmp_path, "cifar", "lora", 0, 50.0, mode="tune")
    _run(tmp_path, "dtd", "lora", 0, 50.0, mode="final")
    with pytest.raises(ValueError, match="several split modes"):
        summarise(load_results(tmp_path))
    assert summarise(load_results(tmp_path), mode="tune").mean_all["last"]["lora"] == (50.0, 1, 19)
    d = run_dir(tmp_path, "final", "kitti", "lora", 0)
    d.mkdir(parents=True)
    (d / "final_metrics.json").write_text("{\n  \"val_top1\": ")
    with pytest.raises(ValueError, match=r"final_metrics.json:2: invalid JSON"):
        load_results(tmp_path)


def test_mixed_settings_warned(tmp_path):
    _run(tmp_path, "cifar", "lora", 0, 50.0)
    _run(tmp_path, "dtd", "lora", 0, 40.0)
    b = tmp_path / "final/dtd/lora/seed0/bench.json"
    rec = json.loads(b.read_text())
    rec["preprocess"]["normalization"] = "inception"
    rec["backbone"] = "vit_base_patch16_224.orig_in21k"
    b.write_text(json.dumps(rec))
    md = write_report(tmp_path)["report.md"].read_text()
    assert "vit_base_patch16_224.orig_in21k" in md
    assert "WARNING: these runs mix several model and normalization settings" in md


def test_best_only_when_evaluated_on_a_schedule(tmp_path):
    _run(tmp_path, "cifar", "lora", 0, 50.0, best=60.0, eval_every=0)   # last epoch only
    md = write_report(tmp_path)["report.md"].read_text()
    assert "best epoch" not in md and "60.00" not in md
    md = write_report(tmp_path, best=True)["report.md"].read_text()      # asked for: "–"
    assert "| cifar | natural | – (last epoch only evaluated) |" in md
    (r,) = load_results(tmp_path)
    assert r.best_top1 is None


def test_anchors_inline_only_for_the_anchor_backbone(tmp_path):
    for i, t in enumerate(VTAB_TASKS):
        _run(tmp_path, t, "lora", 0, 70.0 + i % 3, backbone=ANCHOR_BACKBONE)
        _run(tmp_path, t, "sds_lora", 0, 71.0, backbone=ANCHOR_BACKBONE)
    md = write_report(tmp_path, anchors=True)["report.md"].read_text()
    assert "| LoRA | last epoch (ours) |" in md and "| LoRA r=8 (NOAH's run) | 74.60 | 0.29 |" in md
    assert "| task | group | SDS-LoRA | LoRA |" in md                    # the registry's labels
    assert "LoRA r=8 (NOAH's run) (the LoRA row) | 74.60" in md        # sds_lora's comparison
    assert "NOT comparable" not in md and "NOAH printed 74.5 for LoRA" in md
    assert "| LoRA r=8 (NOAH's run) | 0.29 | 79.5 | 84.6 | 59.8 | 74.60 | 74.5 | 72.25 |" in md
    # another backbone: no anchor column, the table is labelled as not comparable
    other = tmp_path / "other"
    _run(other, "cifar", "lora", 0, 50.0, backbone="test_vit", placement="vpetl")
    md = write_report(other, anchors=True)["report.md"].read_text()
    assert "published row" not in md and "THEIRS" in md
    assert "NOT comparable with the results above" in md and "these runs used test_vit" in md
    assert "The LoRA row's adapter placement is `noah`; these runs used vpetl" in md


def test_sds_paper_report(tmp_path):
    for i, t in enumerate(["cifar100", "dtd"]):
        for seed in (1, 2, 3):
            _run(tmp_path, t, "lora", seed, 80.0 + i + seed, benchmark="sds_paper", eval_every=0,
                 placement="sds_paper")
    md = write_report(tmp_path, anchors=True)["report.md"].read_text()
    assert "# SDS-LoRA paper suite results (final: train -> test)" in md
    assert "| cifar100 | sds_paper | 82.00 ± 1.00 (n=3) |" in md
    assert "mean over 7 datasets" in md and "82.50 (partial: 2/7 datasets)" in md
    assert "best epoch" not in md and "None: no published per-task numbers" in md
