"""The run directory: what `fit` writes, and the checks before it writes anything."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from ..fileio import atomic_write_json, atomic_write_text
from .config import TrainError

EPOCH_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "seconds")
# Everything fit() owns; `--overwrite` removes these and nothing else (e.g. classes.json stays).
OWNED = ("config.json", "metrics.jsonl", "metrics.csv", "steps.jsonl", "diagnostics.jsonl",
         "final_metrics.json", "curves.png", "adapter", "checkpoints")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.last = self.ckpt_dir / "last.pt"
        self.best = self.ckpt_dir / "best.pt"
        self.final = self.path / "final_metrics.json"

    def check(self, resume: bool, overwrite: bool) -> str:
        """Return 'fresh' or 'resume', or raise with a one-line reason. Reads only."""
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"output path {self.path} exists and is not a directory")
        if overwrite and resume:
            raise TrainError("--resume and --overwrite exclude each other: resume continues the "
                             "run in the output dir, overwrite deletes it")
        if overwrite:
            return "fresh"
        if resume:
            return "resume" if self.last.exists() else "fresh"
        if self.final.exists():
            raise TrainError(f"output dir {self.path} holds a finished run (final_metrics.json); "
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

    # --- logs -------------------------------------------------------------------------
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
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps({k: r[k] for k in EPOCH_COLUMNS}) + "\n"
                                  for r in history))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        for r in history:
            w.writerow(r)
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)
