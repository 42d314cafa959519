"""The run directory: the one place that names its files, and the checks before writing.

    <run>/config.json          resolved TrainConfig + data sizes, git commit, versions
          metrics.jsonl, .csv  one row per epoch (EPOCH_COLUMNS)
          steps.jsonl          logged training steps
          diagnostics.jsonl    rows that callbacks log (gradient diagnostics, ...)
          final_metrics.json   written last by `fit`: a run with it is finished
          curves.png           loss / accuracy curves
          adapter/             `save_adapter` output (every weight for `full`)
          checkpoints/last.pt  everything an exact resume needs; best.pt: best epoch's weights
          classes.json, data.json   written by image-folder fine-tuning (`finetune`)
          bench.json, result.json   written by the benchmark harness around `fit`
          .lock                held while a process writes the run (`lock.FolderLock`)
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from ..fileio import atomic_write_json, atomic_write_text
from .config import TrainConfig, TrainError
from .lock import FolderLock

CONFIG = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
STEPS = "steps.jsonl"
DIAGNOSTICS = "diagnostics.jsonl"
DIAGNOSTICS_PNG = "diagnostics.png"
FINAL = "final_metrics.json"
CURVES = "curves.png"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
CLASSES = "classes.json"
DATA = "data.json"
BENCH = "bench.json"
RESULT = "result.json"

EPOCH_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "seconds")
# Everything fit() owns; `--overwrite` removes these and nothing else (e.g. classes.json stays).
OWNED = (CONFIG, METRICS_JSONL, METRICS_CSV, STEPS, DIAGNOSTICS, DIAGNOSTICS_PNG, FINAL, CURVES,
         ADAPTER, CHECKPOINTS)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / CHECKPOINTS
        self.last = self.ckpt_dir / "last.pt"
        self.best = self.ckpt_dir / "best.pt"
        self.final = self.path / FINAL
        self.adapter = self.path / ADAPTER

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def is_finished(self) -> bool:
        return self.final.is_file()

    def lock(self) -> FolderLock:
        """The folder's lock (use as a context manager)."""
        return FolderLock(self.path)

    def check(self, resume: bool, overwrite: bool) -> str:
        """Return 'fresh', 'resume' or 'finished', or raise with a one-line reason. Reads only.

        'finished' = `resume` on a run that already has `final_metrics.json`."""
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"output path {self.path} exists and is not a directory")
        if overwrite and resume:
            raise TrainError("--resume and --overwrite exclude each other: resume continues the "
                             "run in the output dir, overwrite deletes it")
        if overwrite:
            return "fresh"
        if resume:
            if self.final.exists() and not self.last.exists():  # nothing to check it against
                raise TrainError(f"output dir {self.path} holds a finished run without "
                                 f"{self.last.relative_to(self.path)}; pass --overwrite to "
                                 "replace it")
            if self.final.exists():
                return "finished"
            return "resume" if self.last.exists() else "fresh"
        if self.final.exists():
            raise TrainError(f"output dir {self.path} holds a finished run ({FINAL}); "
                             "pass --overwrite to replace it")
        if self.last.exists():
            raise TrainError(f"output dir {self.path} holds an unfinished run; pass --resume to "
                             "continue it or --overwrite to start again")
        return "fresh"

    def clear(self) -> None:
        for name in OWNED:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def prepare(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)

    # --- reading back ---------------------------------------------------------------------
    def read_config(self) -> TrainConfig:
        if not (self.path / CONFIG).is_file():
            raise TrainError(f"{self.path}: not a run directory (no {CONFIG})")
        return TrainConfig.from_dict(self.read_json(CONFIG))

    def read_classes(self) -> list[str]:
        if not (self.path / CLASSES).is_file():
            raise TrainError(f"{self.path}: no {CLASSES} (was it made by `sds-vision finetune`?)")
        return self.read_json(CLASSES)

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    # --- logs -----------------------------------------------------------------------------
    def append_jsonl(self, name: str, row: dict) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_jsonl(self, name: str, max_step: int) -> None:
        """Drop rows logged after the checkpoint a resumed run restarts from."""
        p = self.path / name
        if not p.exists():
            return
        keep = []
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if row.get("step", 0) <= max_step:
                keep.append(line)
        atomic_write_text(p, "".join(line + "\n" for line in keep))

    def read_jsonl(self, name: str) -> list[dict]:
        p = self.path / name
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_epoch_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl and metrics.csv from the full history (small; atomic)."""
        atomic_write_text(self.path / METRICS_JSONL,
                          "".join(json.dumps({k: r[k] for k in EPOCH_COLUMNS}) + "\n"
                                  for r in history))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        for r in history:
            w.writerow(r)
        atomic_write_text(self.path / METRICS_CSV, buf.getvalue())

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)
