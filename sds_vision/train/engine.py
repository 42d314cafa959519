"""`fit`: the one training loop behind the CLI, the demo and the benchmark harness.

`fit` locks the run directory and hands over to a `Trainer`: `setup` builds the model,
optimizer, schedule and batches; `run` restores a checkpoint (or runs a method's start-up
phase), then alternates `train_epoch` and `end_epoch`. Everything an exact resume needs is
one `TrainState`, written to and read from `checkpoints/last.pt` in one place.
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2

from ..adapter_io import save_adapter
from ..fileio import atomic_write
from ..methods.base import adapter_modules, method_callbacks
from ..models import count_parameters, create_sds_model
from . import checkpoint as ckpt_io
from . import schedule
from .callbacks import CallbackList, TrainContext
from .config import NonFiniteLossError, TrainConfig, TrainError, config_diff, git_commit
from .distributed import (
    DistInfo,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
)
from .loader import TrainBatches, eval_batches
from .metrics import autocast_ctx, evaluate
from .plots import plot_curves
from .progress import Progress
from .rundir import ADAPTER, CONFIG, CURVES, DIAGNOSTICS, FINAL, STEPS, RunDir

_NO_BAD_STEP = 2**62
CHECKPOINT_FORMAT = 2
STARTUP_EPOCH = 2**20  # seeds the batch order of start-up steps (never a real epoch)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """`create_sds_model` from a config, seeded so that random init is reproducible."""
    seed_everything(cfg.seed)
    kwargs = dict(cfg.extra_timm_kwargs)
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    return create_sds_model(cfg.model, num_classes=num_classes, method=cfg.method,
                            adapter=cfg.adapter, pretrained=cfg.pretrained,
                            checkpoint_path=cfg.checkpoint_path, **kwargs)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable params split by (head or not) x (weight decay or not) x lr multiplier, like
    timm's `param_groups_weight_decay` plus a separate `head_lr` and the per-parameter lr
    multipliers a method asks for (`LowRankAdapter.param_lr_scales`, e.g. LoRA+)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    scales = {id(getattr(mod, pname)): s for _, mod in adapter_modules(model)
              for pname, s in mod.param_lr_scales().items()}
    no_wd = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip_wd = p.ndim <= 1 or name.endswith(".bias") or name in no_wd
            groups.setdefault((id(p) in head_ids, skip_wd, scales.get(id(p), 1.0)), []).append(p)
    if not groups:
        raise TrainError(f"method {cfg.method!r} left no trainable parameters")
    out = []
    for (is_head, skip_wd, scale), params in sorted(groups.items()):
        lr = cfg.head_lr if is_head and cfg.head_lr is not None else cfg.lr
        name = f"{'head' if is_head else 'body'}{'_no_wd' if skip_wd else ''}"
        out.append({"params": params, "lr": lr * scale,
                    "weight_decay": 0.0 if skip_wd else cfg.weight_decay,
                    "name": name + (f"_lr_x{scale:g}" if scale != 1.0 else "")})
    return out


def save_weights(model: nn.Module, out_dir, method: str) -> None:
    """`adapter/`: `save_adapter` output (every weight for method `full`). A model built
    outside `create_sds_model` (no `sds_config`) gets its trained tensors as safetensors."""
    if hasattr(model, "sds_config"):
        save_adapter(model, out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous()
          for k, v in ckpt_io.trainable_state_dict(model, method == "full").items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(sd, tmp))


@dataclass
class TrainState:
    """Where a run is; with the model, optimizer and scheduler states it is a resume."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0                # epochs done (the next one to train, 0-based)
    step_in_epoch: int = 0        # optimizer steps done in the current epoch
    history: list[dict] = field(default_factory=list)   # one row per finished epoch
    best_top1: float = -1.0
    best_epoch: int = 0
    elapsed: float = 0.0          # seconds spent before this process started

    def to_dict(self) -> dict:
        return asdict(self)


def load_resumable(run: RunDir, cfg: TrainConfig, data_key: dict | None = None) -> dict:
    """`checkpoints/last.pt`, after checking it was made by this version with this config
    (and, when given, the same data sizes); a one-line `TrainError` otherwise."""
    ckpt = ckpt_io.load_checkpoint(run.last)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{run.last}: checkpoint of another sds_vision version "
                         f"(format {ckpt.get('format')}); start again with --overwrite")
    saved, current = dict(ckpt["config_key"]), cfg.resume_key()
    if data_key is not None:
        saved, current = {**saved, **ckpt["data_key"]}, {**current, **data_key}
    diff = config_diff(saved, current)
    if diff:
        raise TrainError(f"--resume with a different config than the run in {run.path}: "
                         + "; ".join(diff))
    return ckpt


def fit(cfg: TrainConfig, train_ds, val_ds, num_classes: int, *, callbacks=(),
        model: nn.Module | None = None) -> dict:
    """Train and evaluate per epoch; returns the dict written to `final_metrics.json`.

    Datasets yield `(float tensor 3xHxW, int label)`, or serve whole batches themselves
    (`loader.is_gatherable`). Under torchrun this runs DDP (each rank gets its shard;
    metrics are reduced; only rank 0 writes). The run directory is locked for the run.
    Raises `TrainError` (one-line message) for run-dir/resume problems and
    `NonFiniteLossError` when the loss stops being finite.
    """
    info = init_distributed()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        run = RunDir(cfg.out_dir)
        run.check(cfg.resume, cfg.overwrite)  # a one-line refusal before taking the lock
        with run.lock() if info.is_main else contextlib.nullcontext():
            mode = run.check(cfg.resume, cfg.overwrite)  # the holder may have finished since
            if mode == "finished":
                load_resumable(run, cfg)
                if info.is_main and cfg.progress:
                    print(f"{run.path}: the run is already finished; nothing to do",
                          flush=True)
                return run.read_json(FINAL)
            trainer = Trainer(cfg, train_ds, val_ds, num_classes, callbacks, info)
            try:
                return trainer.run(mode, model)
            finally:
                trainer.close()
    finally:
        torch.set_num_threads(threads)
        cleanup(info)


class Trainer:
    def __init__(self, cfg: TrainConfig, train_ds, val_ds, num_classes: int, callbacks,
                 info: DistInfo):
        if val_ds is None or len(val_ds) == 0:
            raise TrainError("a non-empty validation set is required")
        self.cfg, self.info, self.num_classes = cfg, info, num_classes
        self.train_ds, self.val_ds = train_ds, val_ds
        self.user_callbacks = list(callbacks)
        self.device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available()
                                   else "cpu")
        self.on_cuda = self.device.type == "cuda"
        self.run_dir = RunDir(cfg.out_dir)
        self.state = TrainState()
        self.t_start = time.perf_counter()

    # --- set-up ---------------------------------------------------------------------------
    def setup(self, model: nn.Module | None) -> None:
        cfg, info = self.cfg, self.info
        if self.on_cuda and cfg.precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        self.model = model if model is not None else build_model(cfg, self.num_classes)
        self.model.to(self.device)
        if self.on_cuda and cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.params = count_parameters(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = create_optimizer_v2(
            param_groups(self.model, cfg), opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
            **({"fused": True} if self.on_cuda else {}))
        self.batches = TrainBatches(self.train_ds, cfg.batch_size, cfg.seed, cfg.num_workers,
                                    info.rank, info.world_size, self.on_cuda, cfg.drop_last)
        self.steps_per_epoch = math.ceil(self.batches.batches_per_epoch / cfg.accum_steps)
        self.scheduler = schedule.build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.val_batches = eval_batches(self.val_ds, cfg.eval_batch_size or 2 * cfg.batch_size,
                                        cfg.num_workers, info.rank, info.world_size, self.on_cuda)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # `compiled` is what evaluation calls; `forward_model` adds DDP's gradient sync
        self.compiled = torch.compile(self.model) if cfg.compile else self.model
        self.forward_model = self.compiled
        if info.enabled:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.compiled, device_ids=[info.local_rank] if self.on_cuda else None)
        # per-rank running sums of the epoch's training loss, on the device (no host sync)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = 0
        self.first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=self.device)
        self.data_key = {"num_classes": self.num_classes, "train_size": len(self.train_ds),
                         "world_size": info.world_size}

    # --- checkpoints: the one place the resume state is written and read ----------------
    def save_last(self) -> None:
        self.check_weights()  # never replace a good checkpoint with inf/NaN weights
        local = {"rng": ckpt_io.rng_state(), "loss_sum": float(self.loss_sum.item()),
                 "loss_count": self.loss_count}
        ranks = gather_objects(local, self.info)
        if self.info.is_main:
            state = dict(self.state.to_dict(),
                         elapsed=self.state.elapsed + time.perf_counter() - self.t_start)
            ckpt_io.save_checkpoint(self.run_dir.last, {
                "format": CHECKPOINT_FORMAT, "config_key": self.cfg.resume_key(),
                "data_key": self.data_key, **state, "ranks": ranks,
                "model": ckpt_io.trainable_state_dict(self.model, self.cfg.method == "full"),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()})
        barrier(self.info)

    def restore(self) -> None:
        ckpt = load_resumable(self.run_dir, self.cfg, self.data_key)
        ckpt_io.load_trainable_state_dict(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**{f: ckpt[f] for f in TrainState.__dataclass_fields__})
        local = ckpt["ranks"][self.info.rank]
        self.loss_sum.fill_(local["loss_sum"])
        self.loss_count = local["loss_count"]
        ckpt_io.set_rng_state(local["rng"])

    # --- the loop -------------------------------------------------------------------------
    def run(self, mode: str, model: nn.Module | None) -> dict:
        cfg, info, run = self.cfg, self.info, self.run_dir
        self.setup(model)  # a setting that fails here leaves the run folder as it was
        barrier(info)  # every rank set up before rank 0 touches the folder
        if info.is_main:
            if cfg.overwrite:
                run.clear()
            run.prepare()
        barrier(info)
        self.progress = Progress(cfg.epochs, self.steps_per_epoch,
                                 enabled=info.is_main and cfg.progress)
        self.callbacks = CallbackList(method_callbacks(self.model) + self.user_callbacks)
        self.ctx = TrainContext(model=self.model, optimizer=self.optimizer, cfg=cfg,
                                out_dir=run.path, is_main=info.is_main, fresh=mode == "fresh",
                                total_steps=self.steps_per_epoch * cfg.epochs,
                                run_steps=self.run_extra_steps)
        if mode == "resume":
            self.restore()
            self.progress.write(f"resuming from epoch {self.state.epoch + 1}, step "
                                f"{self.state.step} ({run.last})")
        else:
            seed_everything(cfg.seed + 1_000_003 * info.rank)  # per-rank dropout streams
        self.scheduler.step(schedule.epoch_position(cfg, self.state.epoch))
        self.scheduler.step_update(self.state.step)
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        self._prepare_logs(resumed=mode == "resume")
        self.progress.write(self._describe())
        self.ctx.step, self.ctx.epoch = self.state.step, self.state.epoch
        self.callbacks.on_train_start(self.ctx)
        self.progress.start(self.state.epoch)
        for epoch in range(self.state.epoch, cfg.epochs):
            self.train_epoch(epoch)
            self.end_epoch(epoch)
        self.progress.close()
        return self.finish()

    def _prepare_logs(self, resumed: bool) -> None:
        if not self.info.is_main:
            return
        run = self.run_dir
        for name in (STEPS, DIAGNOSTICS):
            if resumed:
                run.truncate_jsonl(name, self.state.step)
            else:
                (run / name).unlink(missing_ok=True)
        cfg = self.cfg
        run.write_json(CONFIG, {
            **cfg.to_dict(), **self.data_key, "val_size": len(self.val_ds),
            "steps_per_epoch": self.steps_per_epoch,
            "timm_model": getattr(getattr(self.model, "sds_config", None), "model_name", None),
            "warmup_epochs_used": schedule.warmup_epochs_used(cfg),
            "schedule": schedule.describe(cfg),
            "world_batch_size": cfg.batch_size * cfg.accum_steps * self.info.world_size,
            "git_commit": git_commit(), "resumed_from_step": self.state.step if resumed else None,
            "versions": {"torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            "device": str(self.device)})

    def _describe(self) -> str:
        p, cfg = self.params, self.cfg
        return (f"{cfg.model} / {cfg.method}: {p['trainable']:,} trainable of {p['total']:,} "
                f"parameters; {len(self.train_ds)} train / {len(self.val_ds)} val samples; "
                f"{cfg.epochs} epochs x {self.steps_per_epoch} steps of "
                f"{cfg.batch_size * cfg.accum_steps * self.info.world_size}; lr {cfg.lr:g} "
                f"({schedule.describe(cfg)}); {self.device}"
                f"{', bf16' if self.on_cuda and cfg.precision == 'bf16' else ''} -> "
                f"{self.run_dir.path}")

    def optimizer_step(self, micro_batches: list) -> torch.Tensor:
        """One optimizer step over ``accum_steps`` micro-batches: the loss is the mean over
        all their samples, as if they were one batch. Returns the loss (a device tensor)."""
        total = sum(y.shape[0] for _, y in micro_batches)
        loss_acc = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro_batches):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.on_cuda and self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.info.enabled \
                else self.forward_model.no_sync()
            with sync:
                with autocast_ctx(self.device, self.cfg.precision):
                    logits = self.forward_model(x)
                loss = self.criterion(logits.float(), y) * (y.shape[0] / total)
                loss.backward()
            loss_acc += loss.detach()
        self.ctx.loss = loss_acc
        self.callbacks.on_before_optimizer_step(self.ctx)
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.trainable, self.cfg.clip_grad)
        self.optimizer.step()
        return loss_acc

    def _steps(self):
        """The epoch's batches grouped into optimizer steps (lists of micro-batches)."""
        group: list = []
        for batch in self.batches:
            group.append(batch)
            if len(group) == self.cfg.accum_steps:
                yield group
                group = []
        if group:
            yield group

    def train_epoch(self, epoch: int) -> None:
        cfg, st = self.cfg, self.state
        self.t_epoch = time.perf_counter()
        self.ctx.epoch = epoch
        self.batches.set_epoch(epoch, start=st.step_in_epoch * cfg.accum_steps)
        self.model.train()
        self.progress.start_epoch(epoch, st.step_in_epoch)
        for micro in self._steps():
            self.ctx.step = st.step + 1
            try:
                loss = self.optimizer_step(micro)
            except RuntimeError:
                # non-finite numbers since the last check can make a step fail (e.g. an
                # eigendecomposition of NaN factors): report them, not the symptom
                self.check_finite()
                self.check_weights()
                raise
            st.step += 1
            st.step_in_epoch += 1
            self.lr_used = self.optimizer.param_groups[0]["lr"]  # what logs report, not the next
            self.scheduler.step_update(st.step)
            self.callbacks.on_after_optimizer_step(self.ctx)
            self.first_bad = torch.minimum(
                self.first_bad, torch.where(torch.isfinite(loss), _NO_BAD_STEP, st.step))
            n = sum(y.shape[0] for _, y in micro)
            self.loss_sum += loss.double() * n
            self.loss_count += n
            self.progress.step()
            # Host syncs (reading the loss, checking it is finite) only on logging steps, on
            # every device alike: `first_bad` records the exact first bad step meanwhile, and
            # no checkpoint is written without a check.
            log_now = st.step % max(cfg.log_every_steps, 1) == 0 \
                or st.step_in_epoch == self.steps_per_epoch
            if log_now:
                self.check_finite()
                self._log_step(epoch, float(loss.item()))
            if cfg.save_every_steps and st.step % cfg.save_every_steps == 0 \
                    and st.step_in_epoch < self.steps_per_epoch:
                self.check_finite()
                self.save_last()

    def _log_step(self, epoch: int, loss: float) -> None:
        lr = self.lr_used
        if self.info.is_main:
            self.run_dir.append_jsonl(STEPS, {"step": self.state.step, "epoch": epoch + 1,
                                              "train_loss": loss, "lr": lr})
        self.progress.log_step(epoch, self.state.step_in_epoch, self.state.step, loss, lr)

    def end_epoch(self, epoch: int) -> None:
        """Evaluate (on schedule), record the epoch, write best.pt and last.pt."""
        cfg, st, info = self.cfg, self.state, self.info
        self.check_finite()
        totals = all_reduce_sum(torch.stack([
            self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64,
                                        device=self.device)]), info)
        train_loss = float(totals[0].item() / max(totals[1].item(), 1.0))
        if epoch + 1 == cfg.epochs or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            val = evaluate(self.compiled, self.val_batches,
                           self.num_classes, self.device, precision=cfg.precision,
                           channels_last=cfg.channels_last, info=info)
        else:  # skipped epoch: no val numbers (None in metrics files, gaps in the plot)
            val = {"val_loss": None, "val_top1": None, "val_top5": None}
        row = {"epoch": epoch + 1, "step": st.step, "lr": self.lr_used,
               "train_loss": train_loss, **val, "seconds": time.perf_counter() - self.t_epoch}
        st.history.append(row)
        improved = val["val_top1"] is not None and val["val_top1"] > st.best_top1
        if improved:
            st.best_top1, st.best_epoch = val["val_top1"], epoch + 1
        self.loss_sum.zero_()
        self.loss_count, st.step_in_epoch, st.epoch = 0, 0, epoch + 1
        self.scheduler.step(schedule.epoch_position(cfg, st.epoch))
        if info.is_main:  # best.pt and metrics before last.pt: a crash in between re-runs them
            self.run_dir.write_epoch_metrics(st.history)
            if improved:
                ckpt_io.save_checkpoint(self.run_dir.best, {
                    "model": ckpt_io.trainable_state_dict(self.model, cfg.method == "full"),
                    "epoch": epoch + 1, "step": st.step, "val_top1": st.best_top1,
                    "config_key": cfg.resume_key()})
        self.save_last()
        self.progress.end_epoch(row)
        self.callbacks.on_epoch_end(self.ctx, dict(row))

    def finish(self) -> dict:
        cfg, st, run = self.cfg, self.state, self.run_dir
        last = st.history[-1]
        final = {
            "val_top1": last["val_top1"], "val_top5": last["val_top5"],
            "val_loss": last["val_loss"], "train_loss": last["train_loss"],
            "best_val_top1": st.best_top1, "best_epoch": st.best_epoch, "epochs": cfg.epochs,
            "steps": st.step, "seconds": st.elapsed + time.perf_counter() - self.t_start,
            "params": self.params, "model": cfg.model, "method": cfg.method,
            "val_per_class_top1": last.get("val_per_class_top1", []),
        }
        if self.info.is_main:
            save_weights(self.model, run / ADAPTER, cfg.method)
            plot_curves(st.history, run.read_jsonl(STEPS), run / CURVES,
                        title=f"{cfg.model} / {cfg.method}")
            run.write_json(FINAL, final)
        self.ctx.step = st.step
        self.callbacks.on_train_end(self.ctx)
        barrier(self.info)
        return final

    def close(self) -> None:
        """Stop DataLoader worker processes now (a sweep runs many fits in one process)
        rather than whenever the garbage collector reaches this trainer."""
        self.batches = self.val_batches = None
        if hasattr(self, "ctx"):
            self.ctx.run_steps = None  # the context refers back to this trainer

    # --- helpers --------------------------------------------------------------------------
    def check_finite(self) -> None:
        bad = int(all_reduce_min(self.first_bad.clone(), self.info).item())
        if bad != _NO_BAD_STEP:
            raise NonFiniteLossError(bad, self._epoch_of(bad), self._last_path())

    def check_weights(self) -> None:
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.trainable]).all()):
            raise NonFiniteLossError(self.state.step, self._epoch_of(self.state.step),
                                     self._last_path(), what="weights")

    def _epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch + 1

    def _last_path(self) -> str | None:
        return str(self.run_dir.last) if self.run_dir.last.exists() else None

    def run_extra_steps(self, n: int) -> None:
        """``n`` optimizer steps outside the schedule, for a method's start-up phase: at each
        group's peak lr, on batches of a separate seeded order; no logging, no step count."""
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("initial_lr", g["lr"])
        self.batches.set_epoch(STARTUP_EPOCH)  # an order of its own, apart from the epochs
        self.model.train()
        done = 0
        while done < n:
            for micro in self._steps():
                self.optimizer_step(micro)
                done += 1
                if done == n:
                    break
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr
