"""FGVC reader in the VPT layout.

Each dataset folder holds ``train.json``, ``val.json`` and ``test.json``: one flat JSON
object ``{"<image path relative to the image dir>": <class id>}``. Class ids may be
1-based. VPT (``src/data/datasets/json_dataset.py``, ``_construct_imdb``) maps the sorted
unique ids of EACH split to 0..C-1 separately, which is one consistent mapping only when
every split holds every class. This reader maps the ids once, from the train split, and
applies that mapping to val and test; an id that does not occur in train is an error.

Dataset folders may carry the canonical name or a name used by VPT or V-PETL setups
(``CUB_200_2011``, ``nabirds``, ``OxfordFlowers``, ``StanfordDogs``, ``StanfordCars``, ...;
``FGVCDataset.dirnames``); each folder name is also accepted as a dataset name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sds_vision.data.catalog import BenchmarkDataError, lookup, name_key, pick
from sds_vision.data.listing import SplitListing

__all__ = ["FGVCDataset", "FGVC_DATASETS", "FGVC_ALIASES", "FGVC_SPLITS", "FGVCSplits",
           "resolve_fgvc", "resolve_fgvc_list", "read_fgvc_json", "find_fgvc_dir",
           "load_fgvc", "check_fgvc_root", "line_of_key", "fgvc_listing"]

FGVC_SPLITS = ("train", "val", "test")
# Named split modes: (train split, evaluation split). VPT's get_loaders trains FGVC final
# runs on train only (train+val is VTAB's rule).
SPLIT_MODES: dict[str, tuple[str, str]] = {"tune": ("train", "val"), "final": ("train", "test")}


@dataclass(frozen=True)
class FGVCDataset:
    name: str
    num_classes: int
    image_dir: str                 # relative to the dataset folder ("" = the folder itself)
    sizes: tuple[int, int, int]    # approximate train / val / test sizes in VPT's splits
    dirnames: tuple[str, ...]      # folder names seen in the wild (VPT's first)


FGVC_DATASETS: dict[str, FGVCDataset] = {d.name: d for d in [
    FGVCDataset("cub", 200, "images", (5_394, 600, 5_794), ("CUB_200_2011", "cub", "CUB-200-2011")),
    FGVCDataset("nabirds", 555, "images", (21_536, 2_393, 24_633), ("nabirds", "NABirds")),
    FGVCDataset("oxford_flowers", 102, "", (1_020, 1_020, 6_149),
                ("OxfordFlowers", "OxfordFlower", "oxford_flowers", "flowers")),
    FGVCDataset("stanford_dogs", 120, "Images", (10_800, 1_200, 8_580),
                ("Stanford-dogs", "StanfordDogs", "stanford_dogs", "dogs")),
    FGVCDataset("stanford_cars", 196, "", (7_329, 815, 8_041),
                ("Stanford-cars", "StanfordCars", "stanford_cars", "cars")),
]}


# Every folder name is a dataset name too, plus a few short names.
FGVC_ALIASES: dict[str, str] = {
    **{name_key(d): ds.name for ds in FGVC_DATASETS.values() for d in ds.dirnames
       if name_key(d) != ds.name},
    "cub200": "cub", "birds": "cub",
}


def resolve_fgvc(name: str) -> FGVCDataset:
    """Dataset for a canonical name, folder name or alias (case-insensitive, '-' == '_')."""
    return lookup(name, FGVC_DATASETS, FGVC_ALIASES, "FGVC dataset")


def resolve_fgvc_list(names) -> list[FGVCDataset]:
    return pick(names, resolve_fgvc, {"all": list(FGVC_DATASETS.values())})


def read_fgvc_json(path: str | Path) -> dict[str, int]:
    """Read one split JSON; must be a flat object of ``str -> int``."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: split file missing")
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BenchmarkDataError(
            f"{path}:1: expected a flat JSON object {{image path: class id}}, "
            f"got {type(obj).__name__}")
    for k, v in obj.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise BenchmarkDataError(
                f"{path}:{line_of_key(text, k)}: value for {k!r} must be an integer class id "
                f"(a flat object), got {type(v).__name__}")
    return obj


def line_of_key(text: str, key: str) -> int:
    """Best-effort 1-based line of ``"key"`` in a JSON text (for error messages)."""
    i = text.find(json.dumps(key))
    return text.count("\n", 0, i) + 1 if i >= 0 else 1


def check_fgvc_root(root: Path) -> None:
    if not root.is_dir():
        raise BenchmarkDataError(f"{root}: FGVC data root is not a directory")
    if (root / "train800.txt").is_file() or any(root.glob("*/train800.txt")):
        raise BenchmarkDataError(
            f"{root}: looks like a VTAB-1k dump (train800.txt files), not an FGVC root; "
            "use --benchmark vtab")
    if (root / "train.json").is_file():
        raise BenchmarkDataError(
            f"{root}: this is a single FGVC dataset folder; pass its parent as the data root")


def find_fgvc_dir(root: str | Path, ds: FGVCDataset) -> Path:
    """Dataset folder under ``root`` (canonical name first, then VPT's folder names)."""
    root = Path(root)
    check_fgvc_root(root)
    names = (ds.name,) + ds.dirnames
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise BenchmarkDataError(
        f"{root}: dataset folder missing for {ds.name!r} (looked for {', '.join(names)})")


@dataclass
class FGVCSplits:
    dataset: FGVCDataset
    folder: Path
    class_ids: list[int]                   # original ids, sorted; index = mapped label
    splits: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def load_fgvc(root: str | Path, dataset: str | FGVCDataset,
              splits: tuple[str, ...] = FGVC_SPLITS) -> FGVCSplits:
    """Read the split JSONs and map class ids once, from train."""
    ds = resolve_fgvc(dataset) if isinstance(dataset, str) else dataset
    folder = find_fgvc_dir(root, ds)
    image_dir = folder / ds.image_dir if ds.image_dir else folder
    train = read_fgvc_json(folder / "train.json")
    ids = sorted(set(train.values()))
    if len(ids) > ds.num_classes:
        raise BenchmarkDataError(
            f"{folder / 'train.json'}:1: {len(ids)} distinct class ids, more than the "
            f"{ds.num_classes} of {ds.name}")
    mapping = {c: i for i, c in enumerate(ids)}
    out = FGVCSplits(ds, folder, ids)
    for split in splits:
        path = folder / f"{split}.json"
        obj = train if split == "train" else read_fgvc_json(path)
        samples = []
        for rel, cid in obj.items():
            if cid not in mapping:
                raise BenchmarkDataError(
                    f"{path}:{line_of_key(path.read_text(encoding='utf-8'), rel)}: class id "
                    f"{cid} of {rel!r} does not occur in train.json")
            samples.append((image_dir / rel, mapping[cid]))
        out.splits[split] = samples
    return out


def fgvc_listing(root: str | Path, dataset: str | FGVCDataset, split: str) -> SplitListing:
    """One split as a ``SplitListing`` (class ids mapped once, from train)."""
    loaded = load_fgvc(root, dataset, splits=(split,))
    ds = loaded.dataset
    path = loaded.folder / f"{split}.json"
    image_dir = loaded.folder / ds.image_dir if ds.image_dir else loaded.folder
    samples = loaded.splits[split]

    def locate(i: int) -> str:  # the JSON is read again only for a sample with a problem
        rel = samples[i][0].relative_to(image_dir).as_posix()
        return f"{path}:{line_of_key(path.read_text(encoding='utf-8'), rel)}: entry {rel!r}"

    return SplitListing(ds.name, split, path, [lab for _, lab in samples],
                        loaded.num_classes, locate, paths=[p for p, _ in samples])
