"""`fit`: the one training loop behind the CLI, the demo and the benchmark harness."""

from __future__ import annotations

import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..fileio import atomic_write
from . import checkpoint as ckpt_io
from .callbacks import CallbackList, TrainContext
from .config import NonFiniteLossError, TrainConfig, TrainError, config_diff, git_commit
from .distributed import DistInfo, all_reduce_min, all_reduce_sum, barrier, cleanup, \
    gather_objects, init_distributed
from .loader import eval_loader, train_loader
from .metrics import autocast_ctx, evaluate
from .plots import plot_curves
from .progress import Progress
from .rundir import RunDir

_NO_BAD_STEP = 2**62


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """`create_sds_model` from a config, seeded so that random init is reproducible."""
    from sds_vision import create_sds_model

    seed_everything(cfg.seed)
    kwargs = dict(cfg.extra_timm_kwargs)
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    return create_sds_model(cfg.model, num_classes=num_classes, method=cfg.method, rank=cfg.rank,
                            alpha=cfg.alpha, targets=cfg.targets, basis=cfg.basis,
                            pretrained=cfg.pretrained, checkpoint_path=cfg.checkpoint_path,
                            **kwargs)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable params split by (head or not) x (weight decay or not), like timm's
    `param_groups_weight_decay` plus a separate `head_lr`."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    no_wd = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip_wd = p.ndim <= 1 or name.endswith(".bias") or name in no_wd
            groups.setdefault((id(p) in head_ids, skip_wd), []).append(p)
    if not groups:
        raise TrainError(f"method {cfg.method!r} left no trainable parameters")
    out = []
    for (is_head, skip_wd), params in sorted(groups.items()):
        lr = cfg.head_lr if is_head and cfg.head_lr is not None else cfg.lr
        out.append({"params": params, "lr": lr, "weight_decay": 0.0 if skip_wd else cfg.weight_decay,
                    "name": f"{'head' if is_head else 'body'}{'_no_wd' if skip_wd else ''}"})
    return out


def save_weights(model: nn.Module, out_dir: Path, method: str) -> None:
    """`adapter/`: `save_adapter` output (every weight for method `full`). A model built
    outside `create_sds_model` (no `sds_config`) gets its trained tensors as safetensors."""
    from sds_vision import save_adapter
    if hasattr(model, "sds_config"):
        save_adapter(model, out_dir)
        return
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous()
          for k, v in ckpt_io.trainable_state_dict(model, method == "full").items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(sd, tmp))


def fit(cfg: TrainConfig, train_ds, val_ds, num_classes: int, *, callbacks=(),
        model: nn.Module | None = None) -> dict:
    """Train and evaluate per epoch; returns the dict written to `final_metrics.json`.

    Datasets yield `(float tensor 3xHxW, int label)`. Under torchrun this runs DDP
    (each rank gets its shard; metrics are reduced; only rank 0 writes). Raises
    `TrainError` (one-line message) for run-dir/resume problems and
    `NonFiniteLossError` when the loss stops being finite.
    """
    info = init_distributed()
    try:
        return _fit(cfg, train_ds, val_ds, num_classes, callbacks, model, info)
    finally:
        cleanup(info)


def _fit(cfg, train_ds, val_ds, num_classes, callbacks, model, info: DistInfo) -> dict:
    t_start = time.perf_counter()
    if val_ds is None or len(val_ds) == 0:
        raise TrainError("a non-empty validation set is required")
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    run = RunDir(cfg.out_dir)
    mode = run.check(cfg.resume, cfg.overwrite)
    barrier(info)  # every rank decided before rank 0 touches anything
    if info.is_main:
        if cfg.overwrite:
            run.clear()
        run.prepare()
    barrier(info)

    data_key = {"num_classes": num_classes, "train_size": len(train_ds), "world_size": info.world_size}
    state = None
    if mode == "resume":
        state = ckpt_io.load_checkpoint(run.last)
        diff = config_diff({**state["config_key"], **state["data_key"]},
                           {**cfg.resume_key(), **data_key})
        if diff:
            raise TrainError(f"--resume with a different config than the run in {run.path}: "
                             + "; ".join(diff))

    if model is None:
        model = build_model(cfg, num_classes)
    model.to(device)
    if on_cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    from sds_vision import count_parameters
    params = count_parameters(model)

    optimizer = create_optimizer_v2(param_groups(model, cfg), opt="adamw", lr=cfg.lr,
                                    weight_decay=cfg.weight_decay)
    loader, sampler = train_loader(train_ds, cfg.batch_size, cfg.seed, cfg.num_workers, info.rank,
                                   info.world_size, pin_memory=on_cuda)
    steps_per_epoch = math.ceil(sampler.per_rank / cfg.batch_size)
    # linear warm-up to the peak lr, then a cosine to min_lr ending at the last step
    # (warmup_prefix: the cosine starts after the warm-up instead of overlapping it)
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs - warmup, warmup_epochs=warmup,
        warmup_prefix=True, min_lr=cfg.min_lr, warmup_lr=cfg.lr * 1e-2, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    v_loader = eval_loader(val_ds, cfg.eval_batch_size or 2 * cfg.batch_size, cfg.num_workers,
                           info.rank, info.world_size, pin_memory=on_cuda)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    step, epoch0, step_in_epoch, elapsed0 = 0, 0, 0, 0.0
    history, best_top1, best_epoch = [], -1.0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = 0
    if state is not None:
        ckpt_io.load_trainable_state_dict(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch0, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        history, best_top1, best_epoch = state["history"], state["best_val_top1"], state["best_epoch"]
        elapsed0 = state["elapsed"]
        local = state["ranks"][info.rank]
        loss_sum.fill_(local["loss_sum"])
        loss_count = local["loss_count"]
        scheduler.step_update(step)
        if info.is_main:
            for name in ("steps.jsonl", "diagnostics.jsonl"):
                run.truncate_jsonl(name, step)
    elif info.is_main:
        for name in ("steps.jsonl", "diagnostics.jsonl"):
            (run.path / name).unlink(missing_ok=True)

    if info.is_main:
        run.write_json("config.json", {
            **cfg.to_dict(), **data_key, "val_size": len(val_ds), "steps_per_epoch": steps_per_epoch,
            "timm_model": getattr(getattr(model, "sds_config", None), "model_name", None),
            "warmup_epochs_used": warmup, "world_batch_size": cfg.batch_size * info.world_size,
            "git_commit": git_commit(), "resumed_from_step": step if state else None,
            "versions": {"torch": torch.__version__, "timm": _timm_version(),
                         "python": platform.python_version()}, "device": str(device)})

    train_model = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if on_cuda else None)

    if state is not None:
        ckpt_io.set_rng_state(state["ranks"][info.rank]["rng"])
    else:
        seed_everything(cfg.seed + 1_000_003 * info.rank)  # per-rank dropout/drop-path streams

    ctx = TrainContext(model=model, optimizer=optimizer, cfg=cfg, out_dir=run.path, step=step,
                       epoch=epoch0, is_main=info.is_main)
    cbs = CallbackList(callbacks)
    progress = Progress(cfg.epochs, steps_per_epoch, enabled=info.is_main and cfg.progress)
    trainable = [p for p in model.parameters() if p.requires_grad]
    first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=device)
    # one host sync per step is free on CPU; on GPU only check when we log anyway
    check_every = 1 if not on_cuda else max(cfg.log_every_steps, 1)

    def check_finite():
        bad = int(all_reduce_min(first_bad.clone(), info).item())
        if bad != _NO_BAD_STEP:
            raise NonFiniteLossError(bad, (bad - 1) // steps_per_epoch + 1,
                                     str(run.last) if run.last.exists() else None)

    def save_last(epoch_idx: int, in_epoch: int) -> None:
        # never replace a good checkpoint with weights that are already inf/NaN
        if not bool(torch.stack([torch.isfinite(p).all() for p in trainable]).all()):
            raise NonFiniteLossError(step, (step - 1) // steps_per_epoch + 1,
                                     str(run.last) if run.last.exists() else None, what="weights")
        local = {"rng": ckpt_io.rng_state(), "loss_sum": float(loss_sum.item()),
                 "loss_count": loss_count}
        ranks = gather_objects(local, info)
        if info.is_main:
            ckpt_io.save_checkpoint(run.last, {
                "format": 1, "config_key": cfg.resume_key(), "data_key": data_key,
                "model": ckpt_io.trainable_state_dict(model, cfg.method == "full"),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": epoch_idx, "step_in_epoch": in_epoch, "ranks": ranks,
                "history": history, "best_val_top1": best_top1, "best_epoch": best_epoch,
                "elapsed": elapsed0 + time.perf_counter() - t_start})
        barrier(info)

    cbs.on_train_start(ctx)
    progress.start(epoch0)
    for epoch in range(epoch0, cfg.epochs):
        t_epoch = time.perf_counter()
        ctx.epoch = epoch
        sampler.set_epoch(epoch, start=step_in_epoch * cfg.batch_size)
        train_model.train()
        progress.start_epoch(epoch, step_in_epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if on_cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_ctx(device, cfg.amp):
                logits = train_model(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.step, ctx.loss = step + 1, loss
            cbs.on_before_optimizer_step(ctx)
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
            optimizer.step()
            step += 1
            step_in_epoch += 1
            scheduler.step_update(step)
            cbs.on_after_optimizer_step(ctx)
            loss_d = loss.detach()
            first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss_d), _NO_BAD_STEP, step))
            loss_sum += loss_d.double() * y.shape[0]
            loss_count += y.shape[0]
            progress.step()
            log_now = step % max(cfg.log_every_steps, 1) == 0 or step_in_epoch == steps_per_epoch
            if log_now or step % check_every == 0:
                check_finite()
            if log_now:
                lr = optimizer.param_groups[0]["lr"]
                if info.is_main:
                    run.append_jsonl("steps.jsonl", {"step": step, "epoch": epoch + 1,
                                                     "train_loss": float(loss_d.item()), "lr": lr})
                progress.log_step(epoch, step_in_epoch, step, float(loss_d.item()), lr)
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 \
                    and step_in_epoch < steps_per_epoch:
                check_finite()
                save_last(epoch, step_in_epoch)

        check_finite()
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(loss_count), dtype=torch.float64,
                                                                    device=device)]), info)
        train_loss = float(totals[0].item() / max(totals[1].item(), 1.0))
        if epoch + 1 == cfg.epochs or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0):
            val = evaluate(model, v_loader, num_classes, device, amp=cfg.amp,
                           channels_last=cfg.channels_last, info=info)
        else:  # skipped epoch: no val numbers (None in metrics files, gaps in the plot)
            val = {"val_loss": None, "val_top1": None, "val_top5": None}
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": train_loss, **val, "seconds": time.perf_counter() - t_epoch}
        history.append(row)
        improved = val["val_top1"] is not None and val["val_top1"] > best_top1
        if improved:
            best_top1, best_epoch = val["val_top1"], epoch + 1
        loss_sum.zero_()
        loss_count, step_in_epoch = 0, 0
        if info.is_main:  # best.pt and metrics before last.pt: a crash in between re-runs them
            run.write_epoch_metrics(history)
            if improved:
                ckpt_io.save_checkpoint(run.best, {
                    "model": ckpt_io.trainable_state_dict(model, cfg.method == "full"),
                    "epoch": epoch + 1, "step": step, "val_top1": best_top1,
                    "config_key": cfg.resume_key()})
        save_last(epoch + 1, 0)
        progress.end_epoch(row)
        cbs.on_epoch_end(ctx, dict(row))
    progress.close()

    last = history[-1]
    final = {
        "val_top1": last["val_top1"], "val_top5": last["val_top5"], "val_loss": last["val_loss"],
        "train_loss": last["train_loss"], "best_val_top1": best_top1, "best_epoch": best_epoch,
        "epochs": cfg.epochs, "steps": step, "seconds": elapsed0 + time.perf_counter() - t_start,
        "params": params, "model": cfg.model, "method": cfg.method,
        "val_per_class_top1": last.get("val_per_class_top1", []),
    }
    if info.is_main:
        save_weights(model, run.path / "adapter", cfg.method)
        plot_curves(history, run.read_jsonl("steps.jsonl"), run.path / "curves.png",
                    title=f"{cfg.model} / {cfg.method}")
        run.write_json("final_metrics.json", final)
    ctx.step = step
    cbs.on_train_end(ctx)
    barrier(info)
    return final


def _timm_version() -> str:
    import timm
    return timm.__version__
