"""The benchmark protocols, in code: per benchmark one table of settings, each with where
it comes from (repository and file), the adapter placements, and the preprocessing.
docs/benchmarks.md explains them; every run records the resolved values and their
sources in its ``bench.json``.

Resolution, later wins: the benchmark's settings < its per-task settings < its
per-method settings < ``TASK_HPARAMS`` (edit it to tune one task or method) < the command
line. The adapter placement (which layers get low-rank adapters, dropout, scaling) is
one preset for every low-rank method of a run, so that SDS-LoRA and LoRA differ only in
the method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sds_vision.config import AdapterConfig
from sds_vision.data.benchmarks import BENCHMARKS

__all__ = ["Setting", "Placement", "PLACEMENTS", "Protocol", "PROTOCOLS", "TASK_HPARAMS",
           "TRAIN_FIELDS", "Preprocess", "NORMALIZATIONS", "MODES", "resolve", "hparams",
           "preprocess_for", "get_protocol"]

# Normalisation is a setting, recorded per run: the NOAH/FacT/RepAdapter/Adapter+
# common ground uses ImageNet mean/std; SSF, NOAH's VPT baseline and the Hugging Face
# image processor of Google's ViT-*-in21k checkpoints use 0.5/0.5.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
MODES = tuple(dict.fromkeys(m for b in BENCHMARKS.values() for m in b.split_modes))

# The TrainConfig fields a protocol sets (plus ``rank``, which goes to the adapter).
TRAIN_FIELDS = ("lr", "weight_decay", "batch_size", "accum_steps", "epochs", "sched",
                "sched_per", "warmup_epochs", "warmup_lr", "warmup_prefix", "sched_lag_epochs",
                "min_lr",
                "drop_last", "drop_path", "clip_grad", "label_smoothing")


@dataclass(frozen=True)
class Setting:
    value: object
    source: str


@dataclass(frozen=True)
class Placement:
    """Where low-rank adapters go and how they are scaled; one preset per run."""

    name: str
    targets: tuple[str, ...] | None   # None = the library default (every projection)
    dropout: float
    alpha: float | None               # None: alpha = rank, i.e. scaling 1
    rslora: bool
    summary: str
    source: str

    def adapter(self, rank: int) -> AdapterConfig:
        return AdapterConfig(rank=rank, alpha=self.alpha, targets=self.targets,
                             dropout=self.dropout, rslora=self.rslora)

    def describe(self, rank: int) -> str:
        scale = (self.alpha if self.alpha is not None else rank) / (
            rank ** 0.5 if self.rslora else rank)
        return (f"{self.name}: {self.summary}; targets "
                f"{','.join(self.targets) if self.targets else 'qkv,proj,fc1,fc2'}, rank {rank}, "
                f"dropout {self.dropout:g}, scaling {scale:g}"
                f"{' (rsLoRA alpha/sqrt(r))' if self.rslora else ''}")

    def to_dict(self, rank: int) -> dict:
        return {"placement": self.name, **self.adapter(rank).to_dict(), "source": self.source}


PLACEMENTS: dict[str, Placement] = {p.name: p for p in (
    Placement("noah", ("qkv",), 0.1, None, False,
              "one A (d->r) and one B (r->3d) on the fused qkv of every block",
              "NOAH model/supernet_vision_transformer_timm.py (LoRA on qkv), "
              "supernet_train_prompt.py (--drop_rate_LoRA 0.1)"),
    Placement("vpetl", ("q", "v"), 0.0, None, False,
              "separate A/B pairs on q and v of every block",
              "V-PETL ImageClassification/models/vision_transformer_lora.py "
              "(linear_a_q/linear_b_q, linear_a_v/linear_b_v; no dropout, scaling 1)"),
    Placement("sds_paper", ("q", "v"), 0.1, 4.0, True,
              "separate A/B pairs on query and value, rsLoRA alpha 4",
              "JungHunOh/iclr2026_rebuttal vision/finetune.py (LoraConfig: query, value; "
              "lora_dropout 0.1; use_rslora), vision/script.py (--lora_alpha 4)"),
    Placement("all", None, 0.0, None, False,
              "every projection of the family (this library's default)",
              "sds_vision/inject.py FAMILY_TARGETS"),
)}


@dataclass(frozen=True)
class Preprocess:
    """Input pipeline, recorded with every run.

    ``resize_mode="square"``: resize to ``img_size`` x ``img_size``, no crop (VTAB-1k, the
    SDS-LoRA paper). ``"shorter_side"``: resize the shorter side to ``resize`` and crop
    ``img_size`` (random crop + flip for training when ``augment``, centre crop for
    evaluation; FGVC, VPT's transforms).
    """
    benchmark: str
    img_size: int = 224
    resize: int = 224
    interpolation: str = "bicubic"
    augment: bool = False
    normalization: str = "imagenet"
    resize_mode: str = "square"
    source: str = ""

    @property
    def mean(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][1]

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Protocol:
    """One benchmark's protocol. ``per_task`` settings apply to every method unless
    ``per_method`` sets the same key (full fine-tuning keeps its own learning rate)."""

    benchmark: str
    settings: dict[str, Setting]
    placement: str
    preprocess: Preprocess
    normalization_source: str
    seeds: tuple[int, ...]
    reference_precision: Setting
    best_eval_every: Setting
    per_task: dict[str, dict[str, Setting]] = field(default_factory=dict)
    per_method: dict[str, dict[str, Setting]] = field(default_factory=dict)


_NOAH_SCRIPT = "NOAH configs/LoRA/VTAB/slurm_train_lora_vtab.sh"
_NOAH_TRAIN = "NOAH supernet_train_prompt.py"
_NOAH_SCHED = (f"{_NOAH_TRAIN} (--sched cosine --warmup-epochs 10 --warmup-lr 1e-6 "
               "--min-lr 1e-5; timm CosineLRScheduler stepped once per epoch, "
               "lr_scheduler.step(epoch))")
_FACT_BEST = ("FacT / RepAdapter / V-PETL ImageClassification/train/train_model_lora.py "
              "(test evaluated when ep % 10 == 9, best kept)")
_FULL_LR = {"full": {"lr": Setting(1e-4, "common practice for full fine-tuning in the VTAB/FGVC "
                                         "papers; not a reference script's value")}}

VTAB = Protocol(
    "vtab",
    settings={
        "lr": Setting(1e-3, _NOAH_SCRIPT),
        "weight_decay": Setting(1e-4, _NOAH_SCRIPT),
        "batch_size": Setting(64, _NOAH_SCRIPT),
        "accum_steps": Setting(1, "no gradient accumulation in NOAH / FacT / RepAdapter"),
        "epochs": Setting(100, f"{_NOAH_SCRIPT} (--epochs=100)"),
        "sched": Setting("cosine", _NOAH_SCHED),
        "sched_per": Setting("epoch", _NOAH_SCHED),
        "warmup_epochs": Setting(10, _NOAH_SCHED),
        "warmup_lr": Setting(1e-6, _NOAH_SCHED),
        "min_lr": Setting(1e-5, _NOAH_SCHED),
        "warmup_prefix": Setting(False, "timm CosineLRScheduler default (warmup_prefix=False), "
                                        "as NOAH / FacT / RepAdapter construct it"),
        "sched_lag_epochs": Setting(1, f"{_NOAH_TRAIN} (lr_scheduler.step(epoch) after each "
                                       "epoch: epoch e trains at the value for e - 1)"),
        "drop_last": Setting(True, f"{_NOAH_TRAIN} (train DataLoader drop_last=True)"),
        "drop_path": Setting(0.1, f"{_NOAH_TRAIN} (--drop-path default 0.1)"),
        "clip_grad": Setting(None, f"{_NOAH_TRAIN} (--clip-grad default None); FacT: none"),
        "label_smoothing": Setting(0.0, f"{_NOAH_SCRIPT} (--smoothing=0)"),
        "rank": Setting(8, "NOAH's LoRA row (rank 8, 0.29M parameters)"),
    },
    placement="noah",
    preprocess=Preprocess("vtab", 224, 224, "bicubic", False, "imagenet", "square",
                          "NOAH lib/datasets.py (--direct_resize: Resize((224, 224), "
                          "interpolation=3)); --no_aug in its LoRA script"),
    normalization_source="NOAH lib/datasets.py (ImageNet mean/std unless --inception)",
    seeds=(0, 1, 2),
    reference_precision=Setting("fp32", f"{_NOAH_TRAIN} (--amp off by default); FacT, "
                                        "RepAdapter train in fp32"),
    best_eval_every=Setting(10, _FACT_BEST),
    per_method=_FULL_LR,
)

_VPETL = "V-PETL ImageClassification/"
_VPETL_LR = f"{_VPETL}scripts/run_vit_lora.sh"
_VPETL_CFG = f"{_VPETL}configs/model_lora/fgvc/<dataset>.yaml"
_VPETL_TRAIN = (f"{_VPETL}train/train_model_lora.py (CosineLRScheduler(t_initial=epochs, "
                "warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6), scheduler.step(ep) per epoch)")

FGVC = Protocol(
    "fgvc",
    settings={
        "lr": Setting(1e-3, _VPETL_LR),
        "weight_decay": Setting(5e-2, f"{_VPETL_LR} (--wd 5e-2)"),
        "batch_size": Setting(128, f"{_VPETL_CFG} (batch_size: 128)"),
        "accum_steps": Setting(1, "no gradient accumulation in V-PETL"),
        "epochs": Setting(100, f"{_VPETL_CFG} (epochs: 100)"),
        "sched": Setting("cosine", _VPETL_TRAIN),
        "sched_per": Setting("epoch", _VPETL_TRAIN),
        "warmup_epochs": Setting(10, f"{_VPETL_CFG} (warmup_epochs: 10)"),
        "warmup_lr": Setting(1e-6, _VPETL_TRAIN),
        "min_lr": Setting(1e-5, _VPETL_TRAIN),
        "warmup_prefix": Setting(False, "timm CosineLRScheduler default, as V-PETL builds it"),
        "sched_lag_epochs": Setting(1, f"{_VPETL_TRAIN}: stepped after each epoch"),
        "drop_last": Setting(False, f"{_VPETL}dataloader/loader.py (construct_train_loader: "
                                    "drop_last=False)"),
        "drop_path": Setting(0.1, f"{_VPETL_LR} (--dpr 0.1)"),
        "clip_grad": Setting(None, f"{_VPETL}train/train_model_lora.py (no clipping)"),
        "label_smoothing": Setting(0.0, f"{_VPETL_CFG} (labelsmoothing: 0.0)"),
        "rank": Setting(8, f"{_VPETL_LR} (topN=8)"),
    },
    per_task={
        "cub": {"lr": Setting(1e-3, f"{_VPETL_LR} (CUB_200_2011 --lr 1e-3)")},
        "nabirds": {"lr": Setting(2e-4, f"{_VPETL_LR} (nabirds --lr 2e-4)")},
        "oxford_flowers": {"lr": Setting(1e-3, f"{_VPETL_LR} (OxfordFlower --lr 1e-3)")},
        "stanford_dogs": {"lr": Setting(2.5e-4, f"{_VPETL_LR} (StanfordDogs --lr 2.5e-4)")},
        "stanford_cars": {"lr": Setting(2e-3, f"{_VPETL_LR} (StanfordCars --lr 2e-3)")},
    },
    placement="vpetl",
    preprocess=Preprocess("fgvc", 224, 256, "bilinear", True, "imagenet", "shorter_side",
                          "VPT src/data/transforms.py (train: Resize(256), RandomCrop(224), "
                          "RandomHorizontalFlip; test: Resize(256), CenterCrop(224))"),
    normalization_source="VPT src/data/transforms.py (ImageNet mean/std)",
    seeds=(0, 1, 2),
    reference_precision=Setting("fp32", f"{_VPETL}train/train_model_lora.py (no autocast)"),
    best_eval_every=Setting(10, _FACT_BEST),
    per_method=_FULL_LR,
)

_SDS = "JungHunOh/iclr2026_rebuttal vision/script.py"
_HF = "transformers TrainingArguments default"

SDS_PAPER = Protocol(
    "sds_paper",
    settings={
        "lr": Setting(2e-3, _SDS),
        "weight_decay": Setting(0.0, f"{_SDS} (--weight_decay 0)"),
        "batch_size": Setting(64, f"{_SDS} (--per_device_train_batch_size 64)"),
        "accum_steps": Setting(4, f"{_SDS} (--gradient_accumulation_steps 256 // 64)"),
        "epochs": Setting(10, _SDS),
        "sched": Setting("linear", f"{_HF} (lr_scheduler_type='linear', decays to 0)"),
        "sched_per": Setting("step", f"{_HF} (the scheduler steps with the optimizer)"),
        "warmup_epochs": Setting(0, f"{_SDS} (--warmup_ratio 0)"),
        "warmup_lr": Setting(None, "no warm-up"),
        "min_lr": Setting(0.0, f"{_HF} (linear decay to 0)"),
        "warmup_prefix": Setting(True, "no warm-up (no effect)"),
        "sched_lag_epochs": Setting(0, "per-step schedule (no effect)"),
        "drop_last": Setting(False, f"{_HF} (dataloader_drop_last=False)"),
        "drop_path": Setting(0.0, "transformers models/vit/modeling_vit.py (no stochastic depth)"),
        "clip_grad": Setting(1.0, f"{_HF} (max_grad_norm=1.0)"),
        "label_smoothing": Setting(0.0, f"{_HF} (label_smoothing_factor=0)"),
        "rank": Setting(8, f"{_SDS} (ranks 8 and 32)"),
    },
    per_task={
        "cifar100": {"epochs": Setting(7, _SDS), "lr": Setting(1e-3, _SDS)},
        "resisc45": {"epochs": Setting(10, _SDS), "lr": Setting(2e-3, _SDS)},
        "food101": {"epochs": Setting(10, _SDS), "lr": Setting(2e-3, _SDS)},
        "dtd": {"epochs": Setting(25, _SDS), "lr": Setting(2e-3, _SDS)},
        "cub200": {"epochs": Setting(25, _SDS), "lr": Setting(2e-3, _SDS)},
        "stanford_cars": {"epochs": Setting(20, _SDS), "lr": Setting(5e-3, _SDS)},
        "sun397": {"epochs": Setting(15, _SDS), "lr": Setting(1e-3, _SDS)},
    },
    placement="sds_paper",
    preprocess=Preprocess("sds_paper", 224, 224, "bilinear", False, "inception", "square",
                          "JungHunOh/iclr2026_rebuttal vision/finetune.py (get_transforms: "
                          "Resize((224, 224)), torchvision's default bilinear; no augmentation)"),
    normalization_source=("JungHunOh/iclr2026_rebuttal vision/finetune.py (Normalize with the "
                          "image processor's mean/std: 0.5/0.5 for google/vit-*-in21k)"),
    seeds=(1, 2, 3),
    reference_precision=Setting("fp32", f"{_SDS} (neither --fp16 nor --bf16)"),
    best_eval_every=Setting(10, _FACT_BEST + "; not part of the SDS-LoRA protocol"),
    per_method={"full": {"lr": Setting(1e-4, "not in the authors' scripts (no full "
                                             "fine-tuning run); common practice")}},
)

PROTOCOLS: dict[str, Protocol] = {p.benchmark: p for p in (VTAB, FGVC, SDS_PAPER)}

# Per-(benchmark, task, method) overrides; "*" matches any method. Empty = the
# protocols above everywhere. Example: {("vtab", "kitti", "full"): {"lr": 5e-5}}.
TASK_HPARAMS: dict[tuple[str, str, str], dict[str, object]] = {}


def get_protocol(benchmark: str) -> Protocol:
    if benchmark not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {tuple(PROTOCOLS)}")
    return PROTOCOLS[benchmark]


def resolve(benchmark: str, task: str, method: str, overrides: dict[str, object] | None = None
            ) -> tuple[dict[str, object], dict[str, str]]:
    """(values, sources) of every setting for one run; see the module docstring."""
    p = get_protocol(benchmark)
    layers = [p.settings, p.per_task.get(task, {}), p.per_method.get(method, {})]
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for k, s in layer.items():
            values[k], sources[k] = s.value, s.source
    for key in ((benchmark, task, "*"), (benchmark, task, method)):
        for k, v in TASK_HPARAMS.get(key, {}).items():
            values[k], sources[k] = v, f"TASK_HPARAMS{key} (benchmarks/vtab/protocol.py)"
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k], sources[k] = v, "command line"
    # the engine caps warm-up at epochs - 1 (short CPU runs); record what it will do
    capped = min(int(values["warmup_epochs"]), max(int(values["epochs"]) - 1, 0))
    if capped != values["warmup_epochs"]:
        values["warmup_epochs"] = capped
        sources["warmup_epochs"] += " (capped at epochs - 1)"
    return values, sources


def hparams(benchmark: str, task: str, method: str,
            overrides: dict[str, object] | None = None) -> dict[str, object]:
    """The resolved values of ``resolve``."""
    return resolve(benchmark, task, method, overrides)[0]


def preprocess_for(benchmark: str, img_size: int = 224,
                   normalization: str | None = None) -> Preprocess:
    """The protocol's preprocessing at ``img_size`` (a smaller size for CPU tests keeps
    the resize/crop ratio); ``normalization`` None = the protocol's."""
    base = get_protocol(benchmark).preprocess
    norm = base.normalization if normalization is None else normalization
    if norm not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {norm!r}; expected one of "
                         f"{tuple(NORMALIZATIONS)}")
    resize = round(img_size * base.resize / base.img_size)
    return Preprocess(benchmark, img_size, resize, base.interpolation, base.augment, norm,
                      base.resize_mode, base.source)
