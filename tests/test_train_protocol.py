"""The engine reproduces the benchmark protocols: the VTAB references' learning rate per
epoch (timm's CosineLRScheduler stepped once per epoch) and exact gradient accumulation."""

import json

import pytest
import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch.testing import assert_close

from benchmarks.vtab.protocol import TRAIN_FIELDS, hparams
from sds_vision.train import Callback, TrainConfig, build_model, fit
from sds_vision.train.schedule import build_scheduler, epoch_position


def _protocol_config(benchmark: str, task: str, **kw) -> TrainConfig:
    hp = hparams(benchmark, task, "lora")
    return TrainConfig(**{**{k: hp[k] for k in TRAIN_FIELDS}, **kw}, method="lora")


def _engine_lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[list[float]]:
    """The lr of every optimizer step, per epoch, with the engine's scheduler calls:
    ``step(epoch_position(cfg, epoch))`` at each epoch start, ``step_update(step)`` after
    each update."""
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    step, out = 0, []
    sched.step_update(0)
    for epoch in range(cfg.epochs):
        sched.step(epoch_position(cfg, epoch))
        lrs = []
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            step += 1
            sched.step_update(step)
        out.append(lrs)
    return out


def _timm_per_epoch(epochs: int, **kw) -> list[float]:
    """The lr each epoch trains at in the references' loop (NOAH supernet_train_prompt.py,
    V-PETL train_model_lora.py): train the epoch, then ``scheduler.step(epoch)``."""
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    sched = CosineLRScheduler(opt, t_initial=epochs, **kw)
    out = []
    for epoch in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        sched.step(epoch)
    return out


def test_vtab_schedule_is_the_references_timm_cosine_per_epoch():
    cfg = _protocol_config("vtab", "cifar")
    lrs = _engine_lrs(cfg, steps_per_epoch=15)       # 1,000 images, batch 64, drop_last
    assert all(len(set(e)) == 1 for e in lrs)        # constant within an epoch
    ours = torch.tensor([e[0] for e in lrs], dtype=torch.float64)
    ref = torch.tensor(_timm_per_epoch(100, warmup_t=10, warmup_lr_init=1e-6, lr_min=1e-5),
                       dtype=torch.float64)
    assert_close(ours, ref, rtol=0, atol=0)
    # and the reference really has the features that distinguish it from the old default
    assert ours[0] == ours[1] == 1e-6 and ours[10] < 1e-3 and ours[-1] > 1e-5
    old = _engine_lrs(TrainConfig(epochs=100, lr=1e-3, warmup_epochs=10), 15)
    assert old[0][0] == pytest.approx(1e-5) and old[-1][-1] < 1e-5


def test_sds_paper_schedule_is_linear_decay_per_step_without_warmup():
    cfg = _protocol_config("sds_paper", "dtd", epochs=3)
    lrs = [lr for e in _engine_lrs(cfg, steps_per_epoch=4) for lr in e]
    total = 12
    expect = [2e-3 * (1 - s / total) for s in range(total)]  # transformers' linear schedule
    assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(expect, dtype=torch.float64))
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=2e-3)
    assert isinstance(build_scheduler(cfg, opt, 4), PolyLRScheduler)


def test_engine_records_the_per_epoch_lr_of_timms_scheduler(tmp_path):
    """A real run (the protocol with 4 epochs, 2 of warm-up): the lr the engine trained
    each epoch with equals timm's per-epoch lr."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    ds = torch.utils.data.TensorDataset(x, y)
    cfg = _protocol_config("vtab", "cifar", model="test_vit", epochs=4, warmup_epochs=2,
                           batch_size=4, img_size=32, num_workers=0, eval_every=0,
                           progress=False, out_dir=str(tmp_path / "run"), adapter={"rank": 2})
    fit(cfg, ds, ds, 3)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]                 # drop_last: 8 // 4
    ref = _timm_per_epoch(4, warmup_t=2, warmup_lr_init=1e-6, lr_min=1e-5)
    assert_close(torch.tensor([r["lr"] for r in rows], dtype=torch.float64),
                 torch.tensor(ref, dtype=torch.float64), rtol=0, atol=0)


class _LrSeen(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, ctx) -> None:
        self.lrs.append(ctx.optimizer.param_groups[0]["lr"])


def test_logs_report_the_lr_each_step_trained_with(tmp_path):
    """Per-step schedule: steps.jsonl and metrics.jsonl give the lr of the step just taken,
    not the next step's (the scheduler has already moved on when they are written)."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    ds = torch.utils.data.TensorDataset(x, y)
    cfg = TrainConfig(model="test_vit", method="lora", adapter={"rank": 2}, epochs=3,
                      batch_size=4, lr=1e-2, warmup_epochs=1, sched_per="step", img_size=32,
                      num_workers=0, eval_every=0, log_every_steps=1, progress=False,
                      out_dir=str(tmp_path / "run"))
    seen = _LrSeen()
    fit(cfg, ds, ds, 3, callbacks=[seen])
    run = tmp_path / "run"
    steps = [json.loads(r) for r in (run / "steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(set(seen.lrs)) == 6 and [r["lr"] for r in steps] == seen.lrs
    assert [r["lr"] for r in epochs] == seen.lrs[1::2]  # each epoch's last step


class _Grads(Callback):
    """Keeps the gradients the optimizer step sees."""

    def on_before_optimizer_step(self, ctx) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in ctx.model.named_parameters()
                      if p.requires_grad}


def _one_step(tmp_path, name: str, batch_size: int, accum_steps: int):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    ds = torch.utils.data.TensorDataset(x, y)
    cfg = TrainConfig(model="test_vit", method="lora", adapter={"rank": 2}, epochs=1,
                      batch_size=batch_size, accum_steps=accum_steps, drop_last=True, lr=1e-3,
                      warmup_epochs=0, sched_per="epoch", clip_grad=None, drop_path=0.0,
                      img_size=32, num_workers=0, eval_every=0, progress=False,
                      out_dir=str(tmp_path / name))
    model, grads = build_model(cfg, 3), _Grads()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    final = fit(cfg, ds, ds, 3, model=model, callbacks=[grads])
    assert final["steps"] == 1
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return init, grads.grads, trained


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """4 micro-batches of 4, accumulated, give the gradient and the weights of one batch
    of 16 (a loss summed instead of averaged, or gradients zeroed per micro-batch, would
    not)."""
    init, g_acc, w_acc = _one_step(tmp_path, "accum", batch_size=4, accum_steps=4)
    init_big, g_big, w_big = _one_step(tmp_path, "big", batch_size=16, accum_steps=1)
    assert set(g_acc) == set(g_big) and any("lora_B" in n for n in g_big)
    for n in g_big:
        assert_close(init[n], init_big[n], rtol=0, atol=0)      # same start
        assert_close(g_acc[n], g_big[n], msg=n)
        assert_close(w_acc[n], w_big[n], msg=n)
    assert all(g.abs().sum() > 0 for n, g in g_big.items() if "lora_B" in n)
    assert any(not torch.allclose(w_big[n], init[n]) for n in w_big)          # it trained
