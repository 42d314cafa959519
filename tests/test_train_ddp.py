"""`fit` under torchrun with 2 CPU processes (gloo): sharding, gradient sync, reduced metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sds_vision import load_adapter
from sds_vision.train import TrainConfig, build_model
from sds_vision.train.metrics import evaluate

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_train import Blobs
from sds_vision.train import Callback, TrainConfig, fit

class SaveRankState(Callback):
    def on_train_end(self, ctx):
        sd = {{n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}}
        torch.save(sd, os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))

cfg = TrainConfig(**{cfg!r})
fit(cfg, Blobs(48, 0), Blobs(15, 1), 3, callbacks=[SaveRankState()])
"""


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    from test_train import VAL
    cfg = dict(model="test_vit", method="lora", adapter={"rank": 4}, epochs=2, batch_size=8,
               lr=3e-3, img_size=32, num_workers=0, out_dir=str(tmp_path / "run"), log_every_steps=1,
               progress=False)
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path), cfg=cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ,
                                                      "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    final = json.loads((run / "final_metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["steps_per_epoch"] == 3  # 24 samples per rank
    assert final["steps"] == 6
    steps = [json.loads(x)["step"] for x in (run / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # only rank 0 writes
    # DDP kept the ranks in sync
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    # val metrics were reduced over both (uneven, 8 + 7) shards: equal to one full pass
    model = build_model(TrainConfig(**cfg), 3)
    load_adapter(model, run / "adapter")
    full = evaluate(model, torch.utils.data.DataLoader(VAL, batch_size=16), 3, torch.device("cpu"))
    assert full["val_samples"] == 15
    assert full["val_top1"] == pytest.approx(final["val_top1"], abs=1e-4)
    assert full["val_loss"] == pytest.approx(final["val_loss"], abs=1e-5)
