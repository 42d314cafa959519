"""Sweep throughput: how long the 19-task VTAB-1k sweep takes with the real engine.

For each method of the registry this runs ``fit`` (the engine the harness runs, with the
protocol's hyperparameters) for a few epochs on an in-memory synthetic task with VTAB-1k's
real split sizes: 1,000 training images (train800val200) and, as the evaluation split,
the real test size of ``--eval-task`` (CIFAR-100: 10,000), both held as uint8 on the
training device and served by index (the harness's data path). Random weights and random
pixels: the speed of a step does not depend on either. It measures

- training images/s (steady-state epochs: the first one, with warm-up or compilation, is
  counted in the fixed cost of a run) and the per-epoch overhead (checkpoint, metrics);
- evaluation images/s (the engine's ``evaluate`` on the evaluation split, timed alone);
- JPEG decode images/s of the harness's decoder (``decode_split``: decode + resize to the
  input size, once per split) on generated JPEGs of 32 x 32 (CIFAR-100 / SVHN native size)
  and 256 x 256 (RESISC45 native size, standing in for the larger natural images), with
  one thread and with every core; and the opt-in torchvision decoder on the device;

and projects the wall time of the 19-task sweep (100 epochs, batch 64, one method, one
seed): per task, the measured run extrapolated from its measured epochs to 100, plus the
evaluation of that task's real test split, plus decoding its 1,000 + test images once.

    python benchmarks/vtab/throughput.py --device cuda --out runs/throughput   # ViT-B/16 bf16
    python benchmarks/vtab/throughput.py --quick --out /tmp/tp                 # CPU smoke run

Writes ``throughput.json`` and ``throughput.md`` to ``--out`` after every method, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.vtab.protocol import NORMALIZATIONS, hparams
from sds_vision.config import AdapterConfig
from sds_vision.data.cache import (
    CachedDataset,
    CachedSplit,
    DeviceNormalizer,
    Prep,
    cpu_count,
    decode_split,
)
from sds_vision.data.vtab import VTAB_TASKS
from sds_vision.fileio import atomic_write_json, atomic_write_text
from sds_vision.methods import METHODS
from sds_vision.train import Callback, TrainConfig, fit
from sds_vision.train.loader import eval_batches
from sds_vision.train.metrics import evaluate

SWEEP_EPOCHS = 100   # the VTAB-1k protocol
TRAIN_SIZE = 1000    # train800val200
# Tasks whose images are at most 96 px a side in TFDS (CIFAR-100, SVHN 32; EuroSAT,
# dSprites 64; Patch Camelyon, smallNORB 96): their decode is timed on 32 x 32 JPEGs;
# the other tasks' (256 px to KITTI's 1242 x 375) on 256 x 256 JPEGs, a lower bound.
SMALL_NATIVE = {"cifar", "svhn", "patch_camelyon", "eurosat", "dsprites_loc", "dsprites_ori",
                "smallnorb_azi", "smallnorb_ele"}
DECODE_SIZES = {"small": 32, "large": 256}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--device", default=None, help="cuda or cpu (default: cuda when present)")
    a("--model", default=None, help="timm name or alias (default vit_base; --quick test_vit)")
    a("--img-size", type=int, default=None, help="input size (default 224; --quick 32)")
    a("--batch-size", type=int, default=None, help="training batch (default 64, the protocol)")
    a("--epochs", type=int, default=None,
      help="epochs measured per method (default 3; the first is warm-up)")
    a("--train-size", type=int, default=None, help="training images (default 1000)")
    a("--eval-task", default="cifar", choices=list(VTAB_TASKS),
      help="the task whose real test size (and class count) the evaluation split gets")
    a("--eval-size", type=int, default=None, help="override the evaluation split's size")
    a("--eval-batch-size", type=int, default=None, help="default 512 on CUDA, 128 on CPU")
    a("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    a("--precision", choices=("bf16", "fp32"), default="bf16", help="CUDA only")
    a("--compile", action="store_true", help="torch.compile the model (as --compile does)")
    a("--decode-images", type=int, default=None, help="JPEGs per size (default 512; quick 8)")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a("--quick", action="store_true", help="CPU smoke run: test_vit, 32 px, tiny splits")
    a("--out", default="runs/throughput", help="folder for throughput.json / .md")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    q = args.quick
    args.model = args.model or ("test_vit" if q else "vit_base")
    args.img_size = args.img_size or (32 if q else 224)
    args.batch_size = args.batch_size or (16 if q else 64)
    args.epochs = args.epochs or (2 if q else 3)
    args.train_size = args.train_size or (64 if q else TRAIN_SIZE)
    args.eval_size = args.eval_size or (32 if q else VTAB_TASKS[args.eval_task].test_size)
    args.eval_batch_size = args.eval_batch_size or (512 if args.device.startswith("cuda")
                                                    else 128)
    args.decode_images = args.decode_images or (8 if q else 512)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is warm-up)")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timeline(Callback):
    """Wall-clock marks of a run (synchronised with the device at each mark): the start of
    training, the end of each epoch's training steps and the end of each epoch; at the end
    it times the engine's ``evaluate`` alone on ``val`` with the trained model."""

    def __init__(self, device: torch.device, val, num_classes: int, eval_batch_size: int):
        self.device, self.val, self.num_classes = device, val, num_classes
        self.eval_batch_size = eval_batch_size
        self.start = self.eval_s = 0.0
        self.train_end: list[float] = []
        self.epoch_end: list[float] = []

    def now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def on_train_start(self, ctx) -> None:
        self.start = self.now()
        self.steps_per_epoch = ctx.total_steps // ctx.cfg.epochs

    def on_after_optimizer_step(self, ctx) -> None:
        if ctx.step % self.steps_per_epoch == 0:  # only then: no sync inside an epoch
            self.train_end.append(self.now())

    def on_epoch_end(self, ctx, metrics: dict) -> None:
        self.epoch_end.append(self.now())

    def on_train_end(self, ctx) -> None:
        # warm: fit has just evaluated the same split with the same model
        batches = eval_batches(self.val, self.eval_batch_size, 0, 0, 1, False)
        t = self.now()
        evaluate(ctx.model, batches, self.num_classes, self.device,
                 precision=ctx.cfg.precision, channels_last=ctx.cfg.channels_last)
        self.eval_s = self.now() - t


def synthetic(n: int, size: int, classes: int, device: torch.device, seed: int,
              mean, std) -> CachedDataset:
    """``n`` random uint8 images and labels, generated on ``device`` (no host copy)."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device,
                           generator=g)
    labels = torch.randint(0, classes, (n,), device=device, generator=g)
    return CachedDataset(CachedSplit(images, labels), DeviceNormalizer(mean, std))


def train_config(args, method: str, out_dir: Path) -> TrainConfig:
    """The harness's settings for ``method`` (protocol hyperparameters), for a short run."""
    hp = hparams("vtab", args.eval_task, method, {"epochs": args.epochs,
                                                  "batch_size": args.batch_size})
    return TrainConfig(
        model=args.model, method=method, adapter=AdapterConfig(rank=hp["rank"]),
        epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
        weight_decay=hp["weight_decay"], warmup_epochs=hp["warmup_epochs"], min_lr=hp["min_lr"],
        label_smoothing=hp["label_smoothing"], clip_grad=hp["clip_grad"],
        drop_path=hp["drop_path"], img_size=args.img_size, pretrained=False,
        precision=args.precision, compile=args.compile, channels_last=True, num_workers=0,
        eval_batch_size=args.eval_batch_size, eval_every=0, out_dir=str(out_dir),
        progress=False, log_every_steps=50, threads=args.threads or None)


def measure_method(args, method: str, train, val, num_classes: int, work: Path) -> dict:
    device = torch.device(args.device)
    cfg = train_config(args, method, work / method)
    timeline = Timeline(device, val, num_classes, args.eval_batch_size)
    _sync(device)
    t0 = time.perf_counter()
    final = fit(cfg, train, val, num_classes, callbacks=[timeline])
    _sync(device)
    wall = time.perf_counter() - t0 - timeline.eval_s  # the run alone
    starts = [timeline.start] + timeline.epoch_end[:-1]
    train_s = [end - s for s, end in zip(starts, timeline.train_end)]
    overhead = [e - t for t, e in zip(timeline.train_end[:-1], timeline.epoch_end[:-1])]
    steady = statistics.median(train_s[1:])
    return {
        "train_images_per_s": len(train) / steady,
        "eval_images_per_s": len(val) / timeline.eval_s,
        "epoch_train_s": steady,
        "first_epoch_train_s": train_s[0],
        "epoch_overhead_s": statistics.median(overhead),
        "setup_s": timeline.start - t0,
        "eval_s": timeline.eval_s,
        "run_wall_s": wall,
        "epochs": cfg.epochs,
        "params": final["params"],
        "train_loss": final["train_loss"],
    }


def _jpeg(size: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise, saved at quality 90: JPEG-typical content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], -1)
    arr = np.clip(base + rng.normal(0, 16, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def measure_decode(args, work: Path) -> dict:
    """images/s of decode + resize to the input size, per JPEG size and decoder."""
    out = {}
    prep = Prep(args.img_size)
    for label, size in DECODE_SIZES.items():
        folder = work / f"jpeg{size}"
        folder.mkdir(parents=True, exist_ok=True)
        samples = []
        for i in range(args.decode_images):
            p = folder / f"{i:06d}.jpg"
            _jpeg(size, i).save(p, quality=90)
            samples.append((p, 0))
        row = {"jpeg_size": size, "bytes_per_image": sum(p.stat().st_size for p, _ in samples)
               // len(samples)}
        runs = {"pil_1_thread": dict(num_workers=1),
                f"pil_{cpu_count()}_threads": dict(num_workers=cpu_count()),
                f"torchvision_{args.device}": dict(decoder="torchvision", device=args.device)}
        for name, kw in runs.items():
            decode_split(samples[:4], prep, **kw)  # warm-up (thread pool, nvjpeg handles)
            _sync(torch.device(args.device))
            t = time.perf_counter()
            decode_split(samples, prep, **kw)
            _sync(torch.device(args.device))
            row[name] = len(samples) / (time.perf_counter() - t)
        out[label] = row
    return out


def project(method_row: dict, decode: dict, measured_eval: int) -> dict:
    """Projected seconds of the 19-task sweep for one method (and per task)."""
    per_epoch = method_row["epoch_train_s"] + method_row["epoch_overhead_s"]
    more = SWEEP_EPOCHS - method_row["epochs"]
    best_decode = {k: max(v for n, v in row.items() if n.startswith(("pil_", "torchvision_")))
                   for k, row in decode.items()}
    pil_decode = {k: max(v for n, v in row.items() if n.startswith("pil_"))
                  for k, row in decode.items()}
    tasks, total = {}, {"train_and_fixed_s": 0.0, "eval_s": 0.0, "decode_pil_s": 0.0,
                        "decode_best_s": 0.0}
    for name, t in VTAB_TASKS.items():
        size = "small" if name in SMALL_NATIVE else "large"
        run = method_row["run_wall_s"] + more * per_epoch
        ev = (t.test_size - measured_eval) / method_row["eval_images_per_s"]
        images = TRAIN_SIZE + t.test_size
        row = {"train_and_fixed_s": run, "eval_s": ev,
               "decode_pil_s": images / pil_decode[size],
               "decode_best_s": images / best_decode[size]}
        tasks[name] = row
        for k, v in row.items():
            total[k] += v
    total["sweep_s"] = total["train_and_fixed_s"] + total["eval_s"] + total["decode_pil_s"]
    total["sweep_best_decoder_s"] = (total["train_and_fixed_s"] + total["eval_s"]
                                     + total["decode_best_s"])
    return {"total": total, "tasks": tasks}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, {cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report(result: dict, out: Path) -> None:
    s = result["setting"]
    lines = [f"# VTAB-1k sweep throughput: {s['model']} {s['img_size']}px, batch "
             f"{s['batch_size']}, {s['precision'] if s['device'].startswith('cuda') else 'fp32'}"
             f"{', compiled' if s['compile'] else ''}",
             "", f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}.",
             f"Measured: {s['epochs']} epochs of {s['train_size']} training images per method "
             f"(the first is warm-up); evaluation on {s['eval_size']} images "
             f"({s['eval_task']}'s test size); random weights and pixels.", ""]
    if s["quick"]:
        lines += ["**Quick mode (tiny model, tiny splits): the figures check the script, "
                  "they are not a projection for ViT-B.**", ""]
    lines += ["| method | train img/s | eval img/s | epoch train s | epoch overhead s | "
              "setup s | projected sweep (min) | with best decoder (min) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in result["methods"].items():
        p = result["projection"].get(m, {}).get("total", {})
        lines.append(f"| {m} | {r['train_images_per_s']:.0f} | {r['eval_images_per_s']:.0f} | "
                     f"{r['epoch_train_s']:.3f} | {r['epoch_overhead_s']:.3f} | "
                     f"{r['setup_s']:.1f} | {p.get('sweep_s', float('nan')) / 60:.1f} | "
                     f"{p.get('sweep_best_decoder_s', float('nan')) / 60:.1f} |")
    if result.get("decode"):
        names = [k for k in next(iter(result["decode"].values())) if k not in
                 ("jpeg_size", "bytes_per_image")]
        lines += ["", f"JPEG decode + resize to {s['img_size']} px, images/s "
                  f"({s['decode_images']} generated JPEGs per size, quality 90):", "",
                  "| JPEG | bytes/image | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for row in result["decode"].values():
            lines.append(f"| {row['jpeg_size']} x {row['jpeg_size']} | {row['bytes_per_image']}"
                         " | " + " | ".join(f"{row[n]:.0f}" for n in names) + " |")
    if result["projection"]:
        m0 = next(iter(result["projection"]))
        tot = result["projection"][m0]["total"]
        lines += ["", f"Projected 19-task sweep ({SWEEP_EPOCHS} epochs, batch "
                  f"{s['batch_size']}, one seed), {m0}: train + fixed "
                  f"{tot['train_and_fixed_s'] / 60:.1f} min, evaluation "
                  f"{tot['eval_s'] / 60:.1f} min, decode (PIL) {tot['decode_pil_s'] / 60:.1f} "
                  f"min; total {tot['sweep_s'] / 60:.1f} min (target on one H200: 10 min)."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "throughput.md", text)
    atomic_write_json(out / "throughput.json", result)
    print(text, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    mean, std = NORMALIZATIONS["imagenet"]
    classes = VTAB_TASKS[args.eval_task].num_classes
    result = {"setting": vars(args), "machine": machine(args.device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "decode": {}, "methods": {}, "projection": {}}
    with tempfile.TemporaryDirectory(prefix="sds_throughput_") as tmp:
        work = Path(tmp)
        result["decode"] = measure_decode(args, work)
        report(result, out)
        train = synthetic(args.train_size, args.img_size, classes, device, 0, mean, std)
        val = synthetic(args.eval_size, args.img_size, classes, device, 1, mean, std)
        for method in args.methods:
            print(f"measuring {method} ...", flush=True)
            row = measure_method(args, method, train, val, classes, work)
            result["methods"][method] = row
            result["projection"][method] = project(row, result["decode"], args.eval_size)
            report(result, out)
    return result


if __name__ == "__main__":
    main()
