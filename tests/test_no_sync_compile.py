"""The training loop's speed contract, checked on the CPU: no host sync on non-logging steps,
and `compile=True` (torch.compile of the model) works for every registered method."""

import functools
import sys
from pathlib import Path

import pytest
import torch
from test_train import TRAIN, VAL

import sds_vision
from sds_vision.data.cache import CachedDataset, CachedSplit, DeviceNormalizer
from sds_vision.methods import METHODS
from sds_vision.train import Callback, TrainConfig, fit
from sds_vision.train import loader as loader_mod

# Tensor methods that wait for the device (on CUDA) when called on a device tensor.
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
PACKAGE = str(Path(sds_vision.__file__).parent)
# the sampler turns CPU index tensors into ints by design (never device tensors)
LOADER = str(Path(loader_mod.__file__))


def random_split(n: int, size: int = 32, classes: int = 3, seed: int = 0) -> CachedDataset:
    g = torch.Generator().manual_seed(seed)
    split = CachedSplit(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.randint(0, classes, (n,), generator=g))
    return CachedDataset(split, DeviceNormalizer((0.5,) * 3, (0.5,) * 3))


def cfg_for(tmp_path, method, **kw):
    base = dict(model="test_vit", method=method, adapter={"rank": 4}, epochs=2, batch_size=4,
                lr=1e-3, img_size=32, num_workers=0, warmup_epochs=1, clip_grad=1.0,
                out_dir=str(tmp_path / method), progress=False, threads=1)
    return TrainConfig(**{**base, **kw})


class StepMarks(Callback):
    """The sync-call count at the end of each optimizer step."""

    def __init__(self, calls):
        self.calls, self.marks = calls, {}

    def on_after_optimizer_step(self, ctx):
        self.marks[ctx.step] = len(self.calls)


def count_sync_calls(monkeypatch) -> list:
    """Record every SYNCING call made from sds_vision's own code (except the sampler)."""
    calls = []
    for name in SYNCING:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if where.startswith(PACKAGE) and where != LOADER:
                calls.append((_name, f"{Path(where).name}:{frame.f_lineno}"))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("method,gather", [(m, True) for m in METHODS] + [("lora", False)])
def test_no_host_sync_between_logging_steps(tmp_path, monkeypatch, method, gather):
    train, val = (random_split(40), random_split(8, seed=1)) if gather else (TRAIN, VAL)
    log_every = 5
    cfg = cfg_for(tmp_path, method, log_every_steps=log_every)
    calls = count_sync_calls(monkeypatch)
    marks = StepMarks(calls)
    fit(cfg, train, val, 3, callbacks=[marks])
    monkeypatch.undo()
    per_epoch = -(-len(train) // cfg.batch_size)
    steps = sorted(marks.marks)
    assert steps == list(range(1, cfg.epochs * per_epoch + 1))
    synced = {k: calls[marks.marks[k]:marks.marks[k + 1]] for k in steps[:-1]}
    logging = {k for k in steps if k % log_every == 0 or k % per_epoch == 0}
    # from after step k's callbacks to after step k+1's: k's logging, k+1's data and step
    quiet = {k: c for k, c in synced.items() if k not in logging and c}
    assert not quiet, f"host syncs on non-logging steps: {quiet}"
    # the counter sees the syncs that logging does do (so this test can fail)
    assert all(synced[k] for k in logging if k in synced)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_compile_every_method(tmp_path, monkeypatch, method):
    """`compile=True` trains through torch.compile (the aot_eager backend here: inductor's
    C++ build takes about a minute per model on the CPU; scripts/gpu_check.sh runs inductor
    on CUDA), with no graph break, and matches the eager run."""
    from torch._dynamo.utils import counters
    train, val = random_split(16), random_split(8, seed=1)
    small = dict(epochs=1, batch_size=8, extra_timm_kwargs={"depth": 2})  # tracing time ~ depth
    eager = fit(cfg_for(tmp_path, method, **small), train, val, 3)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = fit(cfg_for(tmp_path / "c", method, compile=True, **small), train, val, 3)
    assert counters["stats"]["unique_graphs"] >= 1           # the model really was compiled
    assert not counters["graph_break"], dict(counters["graph_break"])  # the SDS Function too
    for key in ("train_loss", "val_loss", "val_top1"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-4), key
