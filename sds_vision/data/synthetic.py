"""Deterministic synthetic image-folder tasks (real PNG files) for tests and the demo.

One SOURCE task and three TARGET tasks that need different features:

* ``orientation`` (source): the angle bin of a bar (0/45/90/135 deg, +-12 deg jitter).
  Mirror symmetric pairs (45 <-> 135) swap under a horizontal flip: train with
  ``hflip=False``. A tiny ViT learns it from scratch in about a minute on a CPU (~90%
  val top-1 at 16 px), so it makes a usable source model for the demo;
* ``texture``: the fill pattern of a region - checker / dots / plain / stripes;
* ``count``: how many objects (1-4) are drawn - a global, counting feature;
* ``shapes``: which shape is drawn - circle / cross / square / triangle.

Colours, sizes, positions, rotations and backgrounds are random; every image gets a
background gradient and pixel noise so no single colour statistic solves a task. Each
image draws from its own generator seeded by (seed, task, split, class, index), so a
file does not change when ``n_per_class`` changes, and re-runs give identical bytes (with
the same numpy / Pillow / zlib versions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sds_vision.data.folder import DataError

__all__ = ["SOURCE_TASK", "TARGET_TASKS", "TASKS", "generate_task", "make_demo_data"]

# Class names are listed sorted, so TASKS[task] == ImageFolderSplits(...).classes.
TASKS: dict[str, tuple[str, ...]] = {
    "shapes": ("circle", "cross", "square", "triangle"),
    "count": ("1", "2", "3", "4"),
    "orientation": ("deg000", "deg045", "deg090", "deg135"),
    "texture": ("checker", "dots", "plain", "stripes"),
}
SOURCE_TASK = "orientation"
TARGET_TASKS = ("texture", "count", "shapes")
SPLITS = ("train", "val")
_SS = 4          # draw at 4x, then average 4x4 blocks: anti-aliased edges, no resampler
_VERSION = 2     # bump when drawing changes, so cached folders regenerate


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A background and ``n`` foreground colours at least 90 levels away from it."""
    bg = rng.integers(0, 256, 3)
    fgs = []
    while len(fgs) < n:
        c = rng.integers(0, 256, 3)
        if np.abs(c - bg).max() >= 90:
            fgs.append(c)
    return bg.astype(np.float32), [c.astype(np.float32) for c in fgs]


def _background(rng: np.random.Generator, size: int, bg: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(theta) + yy * np.sin(theta))[..., None] * rng.uniform(0, 50)
    return np.broadcast_to(bg, (size, size, 3)) + ramp


def _polygon(cx: float, cy: float, pts: np.ndarray, angle: float) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return [(cx + x, cy + y) for x, y in rot]


def _unit_outlines() -> dict[str, np.ndarray]:
    """Polygons with the area of the unit circle, so a shape's area (and thus its pixel
    count) says nothing about its class; only the outline does."""
    t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    tri = np.stack([np.cos(t), np.sin(t)], 1)
    a, b = 1.0, 0.33
    cross = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                      [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    square = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    areas = {"square": 4.0, "triangle": 3 * np.sqrt(3) / 4, "cross": 8 * a * b - 4 * b * b}
    pts = {"square": square, "triangle": tri, "cross": cross}
    return {k: pts[k] * np.sqrt(np.pi / areas[k]) for k in pts}


_OUTLINES = _unit_outlines()
# Farthest point from the centre per unit radius: keeps whole shapes inside the canvas.
_EXTENT = {"circle": 1.0, **{k: float(np.hypot(*v.T).max()) for k, v in _OUTLINES.items()}}


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Mask (float 0/1, HxWx1) of a shape with the area of a radius-``r`` circle."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind in _OUTLINES:
        draw.polygon(_polygon(cx, cy, r * _OUTLINES[kind], angle), fill=255)
    elif kind == "bar":  # r = half length; a thin rectangle along the x-axis at `angle`
        w = max(r * 0.16, _SS)
        draw.polygon(_polygon(cx, cy, np.array([[-r, -w], [r, -w], [r, w], [-r, w]]), -angle), 255)
    else:
        raise ValueError(kind)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return canvas * (1 - mask) + mask * colour


def _draw_shapes(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    bg, (fg,) = _colours(rng, 1)
    r = rng.uniform(0.14, 0.26) * size
    cx, cy = rng.uniform(r * _EXTENT[cls], size - r * _EXTENT[cls], 2)
    mask = _shape_mask(cls, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
    return _paint(_background(rng, size, bg), mask, fg)


def _draw_count(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    n = int(cls)
    bg, fgs = _colours(rng, n)
    canvas = _background(rng, size, bg)
    placed: list[tuple[float, float, float, float, str]] = []
    gap = 0.04 * size  # keeps objects apart (and off the border) at every image size
    for attempt in range(100_000):
        if len(placed) == n:
            break
        if attempt % 200 == 199:
            placed = []  # boxed in by an unlucky layout: start over (still deterministic)
        # Sizes overlap across counts so that foreground area alone does not give the count.
        kind = ("circle", "square", "triangle")[rng.integers(3)]
        r = rng.uniform(0.06, 0.12) * size
        e = r * _EXTENT[kind]
        cx, cy = rng.uniform(e + gap, size - e - gap, 2)
        if all(np.hypot(cx - x, cy - y) > e + q + gap for x, y, q, _, _ in placed):
            placed.append((cx, cy, e, r, kind))
    if len(placed) < n:
        raise RuntimeError(f"could not place {n} objects")  # unreachable for n <= 4
    for (cx, cy, _, r, kind), fg in zip(placed, fgs):
        canvas = _paint(canvas, _shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi)), fg)
    return canvas


def _draw_orientation(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    bg, (fg, distractor) = _colours(rng, 2)
    canvas = _background(rng, size, bg)
    dot = rng.uniform(0.05, 0.09) * size  # a round distractor carries no orientation
    canvas = _paint(canvas, _shape_mask("circle", size, *rng.uniform(dot, size - dot, 2), dot, 0),
                    distractor)
    half = rng.uniform(0.25, 0.4) * size
    angle = np.deg2rad(int(cls[3:]) + rng.uniform(-12, 12))
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    return _paint(canvas, _shape_mask("bar", size, cx, cy, half, angle), fg)


def _draw_texture(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    bg, (c1, c2) = _colours(rng, 2)
    canvas = _background(rng, size, bg)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(0.2, 0.3) * size  # >= 3 px at 16 px: no aliasing
    if cls == "stripes":
        on = np.sin(2 * np.pi * u / period) > 0
    elif cls == "checker":
        on = (np.floor(u / period * 1.5) + np.floor(v / period * 1.5)) % 2 == 0
    elif cls == "dots":
        du = (u / period) % 1 - 0.5
        dv = (v / period) % 1 - 0.5
        on = np.hypot(du, dv) < rng.uniform(0.22, 0.32)
    else:  # plain: one colour, randomly either of the two
        on = np.full((size, size), rng.random() < 0.5)
    fill = np.where(on[..., None], c1, c2)
    kind = ("circle", "square")[rng.integers(2)]
    r = rng.uniform(0.3, 0.38) * size
    cx, cy = rng.uniform(r * _EXTENT[kind], size - r * _EXTENT[kind], 2)
    region = _shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
    return canvas * (1 - region) + region * fill


_DRAW = {"shapes": _draw_shapes, "count": _draw_count, "orientation": _draw_orientation,
         "texture": _draw_texture}


def render(task: str, cls: str, img_size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``img_size`` x ``img_size`` x 3 uint8 image of class ``cls`` of ``task``."""
    big = _DRAW[task](rng, cls, img_size * _SS)
    small = big.reshape(img_size, _SS, img_size, _SS, 3).mean(axis=(1, 3))  # box filter
    small = small + rng.normal(0.0, 6.0, small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _params(task: str, n_per_class: int, img_size: int, seed: int, split: str) -> dict:
    return {"task": task, "n_per_class": n_per_class, "img_size": img_size, "seed": seed,
            "split": split, "version": _VERSION}


def generate_task(root: str | os.PathLike, task: str, n_per_class: int,
                  img_size: int = 32, seed: int = 0, split: str = "train") -> Path:
    """Write ``root/<task>/<split>/<class>/<i>.png`` (cached, atomic, byte-identical).

    If the split folder holds a ``.complete`` marker with the same parameters nothing is
    written. Otherwise images go to a temporary folder next to it, which is renamed into
    place, so a crash never leaves a half-written split that looks complete.

    Args:
        root: Output root.
        task: One of ``TASKS``.
        n_per_class: Images per class (> 0).
        img_size: Square image side in pixels (>= 8).
        seed: Base seed; train and val draw different images from the same seed.
        split: ``"train"`` or ``"val"``.

    Returns:
        The split folder ``root/<task>/<split>``.
    """
    if task not in TASKS:
        raise DataError(f"task={task!r}: unknown, expected one of {sorted(TASKS)}")
    if split not in SPLITS:
        raise DataError(f"split={split!r}: expected one of {SPLITS}")
    if int(n_per_class) < 1 or int(img_size) < 8:
        raise DataError(f"n_per_class={n_per_class!r}, img_size={img_size!r}: need >= 1 and >= 8")
    params = _params(task, int(n_per_class), int(img_size), int(seed), split)
    out = Path(root) / task / split
    if _is_complete(out, params):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=out.parent))
    try:
        task_id, split_id = list(TASKS).index(task), SPLITS.index(split)
        for c, cls in enumerate(TASKS[task]):
            (tmp / cls).mkdir()
            for i in range(params["n_per_class"]):
                rng = np.random.default_rng([params["seed"], task_id, split_id, c, i])
                img = render(task, cls, params["img_size"], rng)
                # Fixed compress_level and no metadata: identical bytes on every run.
                Image.fromarray(img).save(tmp / cls / f"{i}.png", compress_level=6)
        (tmp / ".complete").write_text(json.dumps(params, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)  # stale: written with other parameters
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete(out, params):  # lost a race to an identical writer is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_complete(out: Path, params: dict) -> bool:
    try:
        return json.loads((out / ".complete").read_text()) == params
    except (OSError, ValueError):
        return False


def make_demo_data(root: str | os.PathLike, n_train_per_class: int = 64,
                   n_val_per_class: int = 32, img_size: int = 32, seed: int = 0
                   ) -> dict[str, Path]:
    """Generate every task in ``TASKS`` with train and val splits.

    Returns:
        ``{task: root/<task>}``; each is a root ``ImageFolderSplits`` reads directly.
    """
    tasks = {}
    for task in TASKS:
        generate_task(root, task, n_train_per_class, img_size, seed, "train")
        generate_task(root, task, n_val_per_class, img_size, seed, "val")
        tasks[task] = Path(root) / task
    return tasks
