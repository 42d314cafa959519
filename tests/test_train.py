"""Engine tests: run directory, callbacks, exact resume, non-finite loss, run-dir guards."""

import csv
import json

import pytest
import torch
from torch.utils.data import Dataset

from sds_vision import create_sds_model, load_adapter
from sds_vision.train import Callback, NonFiniteLossError, TrainConfig, TrainError, build_model, fit
from sds_vision.train.engine import param_groups
from sds_vision.train.loader import EpochSampler, SeededDataset
from sds_vision.train.metrics import evaluate

NUM_CLASSES = 3


class Blobs(Dataset):
    """Separable 3-class images: class k brightens colour channel k (plus noise)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % NUM_CLASSES
        self.x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        self.x[torch.arange(n), self.y] += 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


TRAIN, VAL = Blobs(48, 0), Blobs(15, 1)


def cfg_for(tmp_path, name="run", **kw):
    base = dict(model="test_vit", method="lora", adapter={"rank": 4}, epochs=2, batch_size=16,
                lr=3e-3, img_size=32, num_workers=0, warmup_epochs=1, out_dir=str(tmp_path / name),
                log_every_steps=1, progress=False)
    return TrainConfig(**{**base, **kw})


def test_fit_run_directory_and_metrics(tmp_path):
    cfg = cfg_for(tmp_path, epochs=3)
    final = fit(cfg, TRAIN, VAL, NUM_CLASSES)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "steps.jsonl", "curves.png",
                 "final_metrics.json", "adapter/adapter_model.safetensors",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "final_metrics.json").read_text()) == json.loads(json.dumps(final))
    for key in ("val_top1", "val_top5", "val_loss", "train_loss", "best_val_top1", "best_epoch",
                "epochs", "steps", "seconds", "params", "model", "method"):
        assert key in final
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [1, 2, 3] and len(csv_rows) == 3
    assert float(csv_rows[-1]["val_top1"]) == pytest.approx(final["val_top1"])
    assert final["val_top1"] == rows[-1]["val_top1"] and final["steps"] == 9 == rows[-1]["step"]
    assert final["best_val_top1"] == max(r["val_top1"] for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 10))
    assert final["params"]["trainable"] == final["params"]["adapter"] + final["params"]["head"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 3e-3 and "git_commit" in config and config["train_size"] == 48
    # the saved adapter reproduces the reported accuracy on a fresh model
    model = build_model(cfg, NUM_CLASSES)  # same seeded random base as the run
    before = evaluate(model, torch.utils.data.DataLoader(VAL, batch_size=8), NUM_CLASSES,
                      torch.device("cpu"))
    load_adapter(model, run / "adapter")
    after = evaluate(model, torch.utils.data.DataLoader(VAL, batch_size=8), NUM_CLASSES,
                     torch.device("cpu"))
    assert after["val_top1"] == final["val_top1"]
    assert after["val_loss"] == pytest.approx(final["val_loss"], abs=1e-6)
    assert before["val_loss"] != pytest.approx(after["val_loss"], abs=1e-3)


class Recorder(Callback):
    def __init__(self):
        self.events, self.grad_seen, self.lrs = [], [], []

    def on_train_start(self, ctx):
        self.events.append(("start", ctx.step))

    def on_before_optimizer_step(self, ctx):
        head = ctx.model.get_classifier()
        self.grad_seen.append(head.weight.grad is not None and head.weight.grad.abs().sum() > 0)
        ctx.log({"kind": "probe", "loss": float(ctx.loss.detach())})

    def on_after_optimizer_step(self, ctx):
        self.events.append(("after", ctx.step))
        self.lrs.append([g["lr"] for g in ctx.optimizer.param_groups])

    def on_epoch_end(self, ctx, metrics):
        self.events.append(("epoch", metrics["epoch"]))

    def on_train_end(self, ctx):
        self.events.append(("end", ctx.step))


def test_callbacks_head_lr_and_diagnostics_log(tmp_path):
    rec = Recorder()
    fit(cfg_for(tmp_path, head_lr=3e-2), TRAIN, VAL, NUM_CLASSES, callbacks=[rec])
    after = [s for e, s in rec.events if e == "after"]
    assert rec.events[0] == ("start", 0) and after == list(range(1, 7))
    assert [s for e, s in rec.events if e == "epoch"] == [1, 2] and rec.events[-1] == ("end", 6)
    assert all(rec.grad_seen) and len(rec.grad_seen) == 6
    diag = [json.loads(x) for x in (tmp_path / "run" / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diag] == list(range(1, 7)) and diag[0]["kind"] == "probe"
    # warm-up then cosine; the head group runs at 10x the body's lr throughout
    body, head = [lrs[0] for lrs in rec.lrs], [lrs[-1] for lrs in rec.lrs]
    assert body[2] == pytest.approx(3e-3) and body[0] < body[1] < body[2]  # peak after warm-up
    assert body[-1] == pytest.approx(0.0) and body[3] > body[4] > body[5]
    assert head[3] == pytest.approx(10 * body[3])


def test_param_groups_split_head_and_no_decay():
    model = create_sds_model("test_vit", num_classes=3, method="lora", rank=2, img_size=32)
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1.0, head_lr=5.0,
                                                                       weight_decay=0.1))}
    assert set(groups) == {"body", "head", "head_no_wd"}
    assert groups["head"]["lr"] == 5.0 and groups["body"]["lr"] == 1.0
    assert groups["head_no_wd"]["weight_decay"] == 0.0 and groups["body"]["weight_decay"] == 0.1
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_after_optimizer_step(self, ctx):
        if ctx.step == self.step:
            raise KeyboardInterrupt  # like a kill: nothing after this step is saved


def test_resume_mid_epoch_is_exact(tmp_path):
    kw = dict(epochs=3, save_every_steps=2, drop_path=0.1, label_smoothing=0.1)
    ref = fit(cfg_for(tmp_path, "ref", **kw), TRAIN, VAL, NUM_CLASSES)
    with pytest.raises(KeyboardInterrupt):  # steps per epoch 3: last save at step 4 (mid-epoch)
        fit(cfg_for(tmp_path, "cut", **kw), TRAIN, VAL, NUM_CLASSES, callbacks=[CrashAt(5)])
    assert not (tmp_path / "cut" / "final_metrics.json").exists()
    assert torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=False)["step"] == 4
    with pytest.raises(TrainError, match="unfinished run"):
        fit(cfg_for(tmp_path, "cut", **kw), TRAIN, VAL, NUM_CLASSES)
    res = fit(cfg_for(tmp_path, "cut", resume=True, **kw), TRAIN, VAL, NUM_CLASSES)
    for key in ("val_top1", "val_top5", "best_val_top1", "best_epoch", "steps"):
        assert res[key] == ref[key], key
    for key in ("val_loss", "train_loss"):
        assert res[key] == pytest.approx(ref[key], abs=1e-6), key
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut/steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # rows past the checkpoint were dropped, then rewritten


def test_resume_refuses_other_config_and_finished_run_needs_overwrite(tmp_path):
    fit(cfg_for(tmp_path, epochs=1), TRAIN, VAL, NUM_CLASSES)
    with pytest.raises(TrainError, match="finished run"):
        fit(cfg_for(tmp_path, epochs=1), TRAIN, VAL, NUM_CLASSES)
    with pytest.raises(TrainError, match=r"different config.*lr: 0.003 -> 0.01"):
        fit(cfg_for(tmp_path, epochs=1, lr=1e-2, resume=True), TRAIN, VAL, NUM_CLASSES)
    # without checkpoints/last.pt there is nothing to check a resume against: refused too
    (tmp_path / "run/checkpoints/last.pt").rename(tmp_path / "last.pt")
    with pytest.raises(TrainError, match=r"finished run without checkpoints/last.pt"):
        fit(cfg_for(tmp_path, epochs=1, lr=1e-2, resume=True), TRAIN, VAL, NUM_CLASSES)
    assert json.loads((tmp_path / "run/config.json").read_text())["lr"] == 3e-3
    again = fit(cfg_for(tmp_path, epochs=1, lr=1e-2, overwrite=True), TRAIN, VAL, NUM_CLASSES)
    assert json.loads((tmp_path / "run/config.json").read_text())["lr"] == 1e-2
    assert again["steps"] == 3


class Poison(Callback):
    def __init__(self, step):
        self.step = step

    def on_after_optimizer_step(self, ctx):
        if ctx.step == self.step:
            with torch.no_grad():
                ctx.model.get_classifier().weight.fill_(float("inf"))


@pytest.mark.parametrize("poison, bad_step, bad_epoch, kept_step, what", [
    (5, 6, 2, 4, "non-finite loss at step 6"),         # next loss is NaN
    (4, 4, 2, 3, "non-finite weights after step 4"),   # caught before checkpointing step 4
])
def test_non_finite_stops_and_keeps_last_good_checkpoint(tmp_path, poison, bad_step, bad_epoch,
                                                         kept_step, what):
    cfg = cfg_for(tmp_path, epochs=3, save_every_steps=2, log_every_steps=100)
    with pytest.raises(NonFiniteLossError, match=what) as err:
        fit(cfg, TRAIN, VAL, NUM_CLASSES, callbacks=[Poison(poison)])
    assert err.value.step == bad_step and err.value.epoch == bad_epoch
    last = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    assert last["step"] == kept_step
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (tmp_path / "run/final_metrics.json").exists()


def test_sampler_is_resumable_and_shards_ranks():
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start=4)
    assert list(s) == full[4:]
    s.set_epoch(2)
    assert [i for i, _ in s] != [i for i, _ in full] and sorted(i for i, _ in full) == list(range(10))
    shards = []
    for rank in range(3):
        r = EpochSampler(10, seed=3, rank=rank, world_size=3)
        r.set_epoch(1)
        shards.append([i for i, _ in r])
    assert all(len(x) == 4 for x in shards)  # padded to equal length
    assert sorted(set(i for x in shards for i in x)) == list(range(10))


class NoisyDataset(Dataset):
    """Uses every global RNG, like an augmentation pipeline would."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import random

        import numpy as np
        return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item(), i])


def test_seeded_dataset_is_deterministic_and_leaves_global_rng_alone():
    ds = SeededDataset(NoisyDataset())
    torch.manual_seed(0)
    a = ds[(1, 123)]
    expected_next = torch.rand(())
    torch.manual_seed(0)
    b = ds[(1, 123)]
    assert torch.equal(a, b) and torch.rand(()) == expected_next
    assert not torch.equal(ds[(1, 124)], a)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         sampler=[(1, 123), (2, 5)])
    assert torch.equal(list(loader)[0], a)  # same values in a worker process (run to the end,
    # so the worker exits now and not when the garbage collector finds the iterator)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    from sds_vision.fileio import atomic_write, atomic_write_text
    target = tmp_path / "last.pt"
    atomic_write_text(target, "good")

    def half_written(tmp):
        with open(tmp, "w") as f:
            f.write("torn")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, half_written)
    assert target.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_progress_plain_lines_when_not_a_terminal():
    import io

    from sds_vision.train.progress import Progress
    stream = io.StringIO()  # not a tty: no bars, plain lines
    p = Progress(epochs=2, steps_per_epoch=3, enabled=True, stream=stream)
    p.start(0)
    p.start_epoch(0, 0)
    p.step()
    p.log_step(0, 1, 1, 0.5, 1e-3)
    p.end_epoch({"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_top1": 90.0,
                 "val_top5": 100.0, "seconds": 1.0})
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["epoch 1/2 step 1/3 (global 1) loss 0.5000 lr 1.000e-03",
                     "epoch 1/2 train_loss 0.5000 val_loss 0.4000 val_top1 90.00 val_top5 100.00 "
                     "(1.0s)"]
    assert p.tty is False


def test_eval_every_zero_evaluates_only_the_last_epoch(tmp_path):
    """Benchmark final runs: no per-epoch test evaluation; the last epoch is still exact."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 3, (24,))
    ds = torch.utils.data.TensorDataset(x, y)
    common = dict(model="test_vit", method="lora", adapter={"rank": 2}, epochs=3, batch_size=8,
                  lr=1e-3, img_size=32, warmup_epochs=0, progress=False)
    every = fit(TrainConfig(**common, out_dir=str(tmp_path / "every")), ds, ds, 3)
    last = fit(TrainConfig(**common, eval_every=0, out_dir=str(tmp_path / "last")), ds, ds, 3)
    assert last["val_top1"] == every["val_top1"] and last["val_loss"] == every["val_loss"]
    rows = [json.loads(r) for r in (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_top1"] is None for r in rows] == [True, True, False]
    assert (tmp_path / "last" / "curves.png").stat().st_size > 1000
