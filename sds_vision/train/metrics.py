"""Evaluation: loss, top-1/top-5 and per-class accuracy (torchmetrics, reduced across ranks)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .distributed import DistInfo, all_reduce_sum


def autocast_ctx(device: torch.device, precision: str = "fp32"):
    """bf16 autocast on CUDA when ``precision == "bf16"``; the CPU always runs float32."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, *,
             precision: str = "fp32", channels_last: bool = False,
             info: DistInfo | None = None) -> dict:
    """Returns `val_loss`, `val_top1`, `val_top5` (percent) and `val_per_class_top1`.

    Metric states are summed over ranks, so each sample counts once when the loader
    shards the set without padding.
    """
    info = info or DistInfo()
    # torchmetrics imports its whole package (~5 s); only pay for it when evaluating
    from torchmetrics.classification import MulticlassAccuracy

    was_training = model.training
    model.eval()
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro",
                              validate_args=False).to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro",
                              validate_args=False).to(device)
    per_class = MulticlassAccuracy(num_classes, top_k=1, average=None,
                                   validate_args=False).to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, precision):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        count += y.numel()
        top1.update(logits, y)
        top5.update(logits, y)
        per_class.update(logits, y)
    all_reduce_sum(loss_sum, info)
    all_reduce_sum(count, info)
    model.train(was_training)
    n = int(count.item())
    if n == 0:
        nan = float("nan")
        return {"val_loss": nan, "val_top1": nan, "val_top5": nan, "val_per_class_top1": [],
                "val_samples": 0}
    return {
        "val_loss": float(loss_sum.item() / n),
        "val_top1": 100.0 * float(top1.compute().item()),
        "val_top5": 100.0 * float(top5.compute().item()),
        "val_per_class_top1": [round(100.0 * float(v), 4) for v in per_class.compute().tolist()],
        "val_samples": n,
    }
