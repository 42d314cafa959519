"""benchmarks/vtab/throughput.py in its --quick CPU mode: every method through the real
engine, decode rates, and a projection that adds up (so the script cannot rot)."""

import json

import pytest
import torch

from benchmarks.vtab import throughput
from sds_vision.data.vtab import VTAB_TASKS
from sds_vision.methods import METHODS


@pytest.mark.slow
def test_throughput_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = throughput.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "throughput.json").read_text())["setting"]["quick"] is True
    assert set(result["methods"]) == set(METHODS)
    for m, row in result["methods"].items():
        assert row["train_images_per_s"] > 0 and row["eval_images_per_s"] > 0, m
        assert row["epochs"] == 2 and row["epoch_train_s"] > 0 and row["run_wall_s"] > 0
        # the run's numbers come from the engine: 64 training images, 2 epochs
        assert row["train_images_per_s"] == pytest.approx(64 / row["epoch_train_s"])
        proj = result["projection"][m]
        assert set(proj["tasks"]) == set(VTAB_TASKS)
        tot = proj["total"]
        assert tot["sweep_s"] == pytest.approx(tot["train_and_fixed_s"] + tot["eval_s"]
                                               + tot["decode_pil_s"])
        assert tot["eval_s"] == pytest.approx(sum(t["eval_s"] for t in proj["tasks"].values()))
        # 98 more epochs at the measured epoch time + overhead, on top of the measured run
        per_epoch = row["epoch_train_s"] + row["epoch_overhead_s"]
        assert proj["tasks"]["dtd"]["train_and_fixed_s"] == pytest.approx(
            row["run_wall_s"] + 98 * per_epoch)
        # evaluation scales with each task's real test size (dSprites 73,728 vs KITTI 711)
        ev = proj["tasks"]
        assert ev["dsprites_loc"]["eval_s"] == pytest.approx(
            (73_728 - 32) / row["eval_images_per_s"])
        assert ev["dsprites_loc"]["eval_s"] > 50 * ev["kitti"]["eval_s"]
    for size in ("small", "large"):
        d = result["decode"][size]
        rates = [v for k, v in d.items() if k.startswith(("pil_", "torchvision_"))]
        assert len(rates) == 3 and all(r > 0 for r in rates)
    md = (tmp_path / "throughput.md").read_text()
    assert "Quick mode" in md and "| sds_lora |" in md and "| 256 x 256 |" in md
