"""Atomic checkpoints with everything an exact resume needs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainable_state_dict(model: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """Parameters that training changes (all of them for full fine-tuning) plus buffers."""
    sd = model.state_dict()
    if full:
        return sd
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v for k, v in sd.items() if k in keep}


def load_trainable_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing_trainable = sorted(set(missing) & trainable)
    if unexpected or missing_trainable:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing_trainable[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # RNG states hold numpy arrays and tuples; the file is our own, so full unpickling is fine
    return torch.load(path, map_location="cpu", weights_only=False)
