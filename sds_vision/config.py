"""Adapter settings: one frozen dataclass that flows CLI -> TrainConfig -> create_sds_model
-> inject_adapters -> the adapter layer, and is saved in ``sds_config.json``.

Torch-free on purpose: the command line builds its flags (names, defaults, help) from
these fields without importing torch. A field's ``metadata`` holds its help text and, for
method-specific options, the methods it applies to.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


def _opt(default: Any, help: str, methods: tuple[str, ...] | None = None,
         choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "methods": methods,
                                            "choices": choices})


@dataclass(frozen=True)
class AdapterConfig:
    """How low-rank adapters are built. Fields without ``methods`` apply to every
    low-rank method; ``full`` and ``linear`` use none of them."""

    rank: int = _opt(8, "adapter rank r")
    alpha: float | None = _opt(None, "scaling numerator: s = alpha/r (alpha/sqrt(r) with "
                                     "--rslora); default alpha = r, i.e. s = 1")
    targets: tuple[str, ...] | None = _opt(
        None, "comma-separated layers to adapt: qkv, proj, fc1, fc2, or q/k/v (slices of the "
              "fused qkv, each with its own A/B pair); default: every projection the family has")
    dropout: float = _opt(0.0, "dropout on the adapter branch input")
    rslora: bool = _opt(False, "rank-stabilised scaling s = alpha/sqrt(r)")
    basis: str = _opt("polar", "orthonormal basis of the factors for the SDS gradient",
                      methods=("sds_lora",), choices=("polar", "qr"))
    bases_refresh: str = _opt("authors", "when the bases are re-derived by QR: every step, or "
                                         "the authors' schedule (every step in the first fifth "
                                         "of training, ..., every 5th step in the last)",
                              methods=("sds_lora_bases",), choices=("authors", "every"))
    bases_startup: str = _opt("authors", "start-up: the authors' 50-step pre-phase and SVD "
                                         "split at step 10, or random orthonormal bases",
                              methods=("sds_lora_bases",), choices=("authors", "random"))
    lora_plus_ratio: float = _opt(16.0, "learning rate of B / learning rate of A",
                                  methods=("lora_plus",))
    pissa_svd: str = _opt("exact", "SVD of W0 for the initial factors: exact, or randomized "
                                   "(--pissa-niter power iterations)",
                          methods=("pissa",), choices=("exact", "randomized"))
    pissa_niter: int = _opt(4, "power iterations of the randomized SVD", methods=("pissa",))

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(
                t.strip() for t in self.targets.split(",") if t.strip()) or None)
        elif self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.lora_plus_ratio > 0:
            raise UserError(f"lora_plus_ratio must be > 0, got {self.lora_plus_ratio!r}")
        if isinstance(self.pissa_niter, bool) or not isinstance(self.pissa_niter, int) \
                or self.pissa_niter < 0:
            raise UserError(f"pissa_niter must be an integer >= 0, got {self.pissa_niter!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"{f.name} must be one of {', '.join(choices)}, "
                                f"got {getattr(self, f.name)!r}")

    @property
    def scaling(self) -> float:
        """``s`` of ``W0 + s·ΔW``: ``alpha / r``, or ``alpha / sqrt(r)`` with rslora."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        """Build from a dict, ignoring keys this version does not know (and None values
        of fields whose default is not None, as older files wrote them)."""
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d and not (d[f.name] is None and f.default is not None):
                kw[f.name] = d[f.name]
        return cls(**kw)

    def updated(self, **changes: Any) -> "AdapterConfig":
        """A copy with ``changes`` applied; an unknown option is a one-line error."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise UserError(f"unknown adapter option {', '.join(unknown)}; the options are "
                            f"{', '.join(names)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(adapter fields, everything else)`` of a keyword dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        return ({k: v for k, v in kwargs.items() if k in names},
                {k: v for k, v in kwargs.items() if k not in names})
