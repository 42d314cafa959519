"""What a sweep will do, in words and numbers, before any compute: the resolved protocol
(schedule, last batch, precision, evaluation, adapter placement, per-task settings) and
each method's trainable parameters next to the published anchor's.

Parameters are counted on a model built on the ``meta`` device: no weights are allocated
or loaded, so the count is instant for ViT-B and works with ``--no-pretrained``.
"""

from __future__ import annotations

import math

import torch

from benchmarks.vtab.anchors import (
    ANCHOR_BACKBONE,
    ANCHOR_ROWS,
    ANCHOR_SETS,
    LORA_ROW,
    LORA_ROW_ADAPTER_PARAMS,
    anchor_row_for,
)
from benchmarks.vtab.protocol import PLACEMENTS, TRAIN_FIELDS, get_protocol, resolve
from sds_vision import count_parameters, create_sds_model, resolve_model_name
from sds_vision.config import AdapterConfig
from sds_vision.methods import get_method
from sds_vision.train import schedule
from sds_vision.train.config import TrainConfig

__all__ = ["count_on_meta", "steps_per_epoch", "describe_schedule", "protocol_lines",
           "parameter_lines"]


def count_on_meta(model: str, method: str, adapter: AdapterConfig, num_classes: int,
                  img_size: int | None = None) -> dict[str, int]:
    """``count_parameters`` of the model a run builds, built on the meta device."""
    kwargs = {"img_size": img_size} if img_size else {}
    with torch.device("meta"):
        m = create_sds_model(resolve_model_name(model), num_classes=num_classes, method=method,
                             adapter=adapter, pretrained=False, **kwargs)
    return count_parameters(m)


def steps_per_epoch(n_train: int, hp: dict) -> int:
    """Optimizer steps per epoch on one process, as the engine counts them."""
    b = hp["batch_size"]
    batches = n_train // b if hp["drop_last"] else math.ceil(n_train / b)
    return math.ceil(batches / hp["accum_steps"])


def describe_schedule(hp: dict) -> str:
    """The engine's one-line description of the schedule of resolved settings ``hp``."""
    cfg = TrainConfig(**{k: hp[k] for k in TRAIN_FIELDS}, method="lora")
    return schedule.describe(cfg)


def protocol_lines(benchmark: str, tasks: list[str], methods: list[str], overrides: dict,
                   train_sizes: dict[str, int], precision: str, eval_every: int,
                   placement: str, rank: int) -> list[str]:
    """The resolved protocol, one setting per line; per-task values where they differ."""
    p = get_protocol(benchmark)
    first, _ = resolve(benchmark, tasks[0], methods[0], overrides)
    out = [f"protocol {benchmark} (each run's bench.json records every value and its source):"]
    out.append(f"  AdamW, weight decay {first['weight_decay']:g}, batch "
               f"{first['batch_size']} x {first['accum_steps']} accumulation step(s) = "
               f"{first['batch_size'] * first['accum_steps']} per update, drop_path "
               f"{first['drop_path']:g}, clip_grad {first['clip_grad']}, label smoothing "
               f"{first['label_smoothing']:g}")
    out.append(f"  schedule: {describe_schedule(first)}")
    out.append(f"  drop_last {first['drop_last']} (last partial batch "
               f"{'dropped' if first['drop_last'] else 'kept'})")
    ref = p.reference_precision
    out.append(f"  precision {precision} on CUDA (the references: {ref.value}; "
               f"--precision {ref.value} reproduces them; the CPU always runs fp32)")
    out.append("  evaluation: " + ("last epoch only" if eval_every == 0 else
                                   f"every {eval_every} epoch(s) and the last; best = max "
                                   "over those epochs"))
    out.append(f"  adapter placement {PLACEMENTS[placement].describe(rank)} "
               f"[{PLACEMENTS[placement].source}]")
    by_text: dict[str, list[str]] = {}  # tasks with the same settings share one line
    for t in tasks:
        per: dict[str, list[str]] = {}
        for m in methods:
            hp, _ = resolve(benchmark, t, m, overrides)
            text = f"lr {hp['lr']:g}, {hp['epochs']} epochs"
            n = train_sizes.get(t)
            if n is not None:
                steps = steps_per_epoch(n, hp)
                text += (f", {steps} steps/epoch on {n:,} train images" if steps else
                         f", NO steps: batch {hp['batch_size']} > {n:,} train images and the "
                         "last partial batch is dropped (lower --batch-size)")
            per.setdefault(text, []).append(m)
        line = ("; ".join(f"{', '.join(ms)}: {text}" for text, ms in per.items())
                if len(per) > 1 else next(iter(per)))
        by_text.setdefault(line, []).append(t)
    for line, ts in by_text.items():
        who = f"all {len(ts)} tasks" if len(ts) == len(tasks) > 1 else ", ".join(ts)
        out.append(f"  {who}: {line}")
    return out


def parameter_lines(benchmark: str, model: str, methods: list[str], placement: str, rank: int,
                    num_classes: int, img_size: int | None) -> list[str]:
    """Each method's trainable parameters (counted on the meta device) beside the anchor's."""
    backbone = resolve_model_name(model)
    anchors = ANCHOR_SETS.get(benchmark)
    comparable = anchors is not None and backbone == ANCHOR_BACKBONE
    adapter = PLACEMENTS[placement].adapter(rank)
    out = [f"trainable parameters of {backbone} ({num_classes}-class head), counted on the "
           f"meta device; placement {placement}, rank {rank}:"]
    out.append(f"  {'method':<16}{'adapter':>14}{'excl. head':>14}{'head':>10}  anchor")
    for m in methods:
        try:
            c = count_on_meta(model, m, adapter, num_classes, img_size)
        except Exception as e:  # a method whose set-up cannot run on meta tensors
            out.append(f"  {m:<16}  not countable on the meta device ({type(e).__name__}: {e})")
            continue
        body = c["trainable"] - c["head"]
        kind = get_method(m).trains
        adapter_n = f"{c['adapter']:,}" if kind == "adapters" else f"- ({kind})"
        out.append(f"  {m:<16}{adapter_n:>14}{body:>14,}{c['head']:>10,}  "
                   + _anchor_text(m, comparable, anchors, backbone, placement, rank))
    return out


def _anchor_text(method: str, comparable: bool, anchors, backbone: str, placement: str,
                 rank: int) -> str:
    if anchors is None:
        return "none published"
    if not comparable:
        return f"not shown: published numbers are for {ANCHOR_BACKBONE}, not {backbone}"
    row = anchor_row_for(method)
    if row is None:
        return "no published row"
    params = ANCHOR_ROWS[row][0]
    if row != LORA_ROW:
        return f"{row}: {params}M"
    note = "" if method == "lora" else " (the LoRA row)"
    if anchors.placement and placement != anchors.placement:
        note += f" [its placement: {anchors.placement}]"
    if rank != 8:
        note += " [its rank: 8]"
    return f"{row}{note}: {LORA_ROW_ADAPTER_PARAMS:,} ({params}M)"
