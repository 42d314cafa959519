"""The VTAB-1k and FGVC protocols, in code: one table of hyperparameters, named split
modes, preprocessing and normalisation as recorded settings (docs/benchmarks.md).

To change a hyperparameter for one task or method, edit ``TASK_HPARAMS`` (or pass an
override on the command line, which is recorded in the run's ``bench.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sds_vision.data.fgvc import SPLIT_MODES as FGVC_SPLIT_MODES
from sds_vision.data.vtab import SPLIT_MODES as VTAB_SPLIT_MODES

__all__ = ["Preprocess", "NORMALIZATIONS", "COMMON_HPARAMS", "METHOD_HPARAMS", "TASK_HPARAMS",
           "ENGINE_FIXED", "SPLIT_MODES", "hparams", "preprocess_for", "BENCHMARKS"]

BENCHMARKS = ("vtab", "fgvc")

# Normalisation is a setting, recorded per run: the NOAH/FacT/RepAdapter/Adapter+
# common ground uses ImageNet mean/std; SSF and NOAH's VPT baseline use 0.5/0.5.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Split modes: (train split, evaluation split) per benchmark.
SPLIT_MODES: dict[str, dict[str, tuple[str, str]]] = {
    "vtab": VTAB_SPLIT_MODES, "fgvc": FGVC_SPLIT_MODES}
MODES = tuple(VTAB_SPLIT_MODES)  # every benchmark names its modes alike: tune, final

# NOAH / FacT defaults for VTAB-1k, and VPT's schedule for FGVC (lr/wd chosen on val there).
COMMON_HPARAMS: dict[str, object] = {
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "epochs": 100,
    "warmup_epochs": 10,
    "drop_path": 0.1,
    "rank": 8,
    "label_smoothing": 0.0,
    "clip_grad": None,        # NOAH/FacT do not clip gradients
    "min_lr": 0.0,
}
# What the engine always does (not configurable there); recorded with every run.
ENGINE_FIXED = {"optimizer": "adamw", "scheduler": "cosine, linear warm-up (per step)"}

METHOD_HPARAMS: dict[str, dict[str, object]] = {
    "sds_lora": {},
    "lora": {},
    "full": {"lr": 1e-4},     # full fine-tuning is commonly run at lr 1e-4
    "linear": {},
}

# Per-(benchmark, task, method) overrides; "*" matches any method. Empty = the
# published defaults everywhere. Example: {("vtab", "kitti", "full"): {"lr": 5e-5}}.
TASK_HPARAMS: dict[tuple[str, str, str], dict[str, object]] = {}


def hparams(benchmark: str, task: str, method: str,
            overrides: dict[str, object] | None = None) -> dict[str, object]:
    """Resolved hyperparameters: common < method < task table < command-line overrides."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    if method not in METHOD_HPARAMS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHOD_HPARAMS)}")
    hp = dict(COMMON_HPARAMS)
    hp.update(METHOD_HPARAMS[method])
    hp.update(TASK_HPARAMS.get((benchmark, task, "*"), {}))
    hp.update(TASK_HPARAMS.get((benchmark, task, method), {}))
    hp.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # the engine caps warm-up at epochs - 1 (short CPU runs); record what it will do
    hp["warmup_epochs"] = min(int(hp["warmup_epochs"]), max(int(hp["epochs"]) - 1, 0))
    return hp


@dataclass(frozen=True)
class Preprocess:
    """Input pipeline, recorded with every run.

    VTAB: resize to ``img_size`` square (bicubic), no augmentation, train == eval.
    FGVC: train = resize shorter side to ``resize``, random crop ``img_size``, flip;
    eval = resize shorter side to ``resize``, centre crop ``img_size``.
    """
    benchmark: str
    img_size: int = 224
    resize: int = 224
    interpolation: str = "bicubic"
    augment: bool = False
    normalization: str = "imagenet"

    @property
    def mean(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][1]

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std}


def preprocess_for(benchmark: str, img_size: int = 224,
                   normalization: str = "imagenet") -> Preprocess:
    """The protocol's preprocessing; a smaller ``img_size`` (CPU tests) scales FGVC's
    256/224 resize/crop ratio along."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; "
                         f"expected one of {tuple(NORMALIZATIONS)}")
    if benchmark == "vtab":
        return Preprocess("vtab", img_size, img_size, "bicubic", False, normalization)
    if benchmark == "fgvc":
        return Preprocess("fgvc", img_size, round(img_size * 256 / 224), "bilinear", True,
                          normalization)
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
