"""FGVC (VPT layout) reader and validation on tiny generated datasets."""

import json

import pytest

from benchmarks.vtab.tiny import make_tiny_fgvc, make_tiny_vtab
from sds_vision.data.fgvc import (
    FGVC_DATASETS,
    load_fgvc,
    read_fgvc_json,
    resolve_fgvc,
    resolve_fgvc_list,
)
from sds_vision.data.validate import validate_fgvc
from sds_vision.data.vtab import BenchmarkDataError


@pytest.fixture
def root(tmp_path):
    return make_tiny_fgvc(tmp_path / "fgvc", {"cub": 3, "stanford_dogs": 4, "OxfordFlower": 2})


def test_table_and_aliases():
    assert {d.name: d.num_classes for d in FGVC_DATASETS.values()} == {
        "cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120,
        "stanford_cars": 196}
    assert resolve_fgvc("Stanford-cars").image_dir == "" and resolve_fgvc("dogs").image_dir == "Images"
    assert resolve_fgvc("cub200").image_dir == "images"
    assert len(resolve_fgvc_list("all")) == 5
    with pytest.raises(BenchmarkDataError, match="unknown FGVC dataset 'aircraft'"):
        resolve_fgvc("aircraft")


def test_reader_image_dirs_and_one_mapping(root):
    cub = load_fgvc(root, "cub")
    assert cub.class_ids == [1, 2, 3] and cub.num_classes == 3      # 1-based ids -> 0..2
    p, lab = cub.splits["train"][1]
    assert p.parent.parent == root / "cub" / "images" and p.is_file() and lab == 1
    dogs = load_fgvc(root, "dogs")
    assert all((root / "stanford_dogs" / "Images") in p.parents for p, _ in dogs.splits["test"])
    flowers = load_fgvc(root, "oxford_flowers")                       # VPT folder name
    assert flowers.folder.name == "OxfordFlower"
    assert flowers.splits["val"][0][0].parent.parent == root / "OxfordFlower"


def test_mapping_from_train_only(root):
    # val uses a class id absent from train -> error naming the file and line
    f = root / "cub" / "val.json"
    obj = json.loads(f.read_text())
    k = list(obj)[1]
    obj[k] = 77
    f.write_text(json.dumps(obj, indent=1))
    with pytest.raises(BenchmarkDataError, match=r"val.json:3: class id 77 .* does not occur in train"):
        load_fgvc(root, "cub")


def test_not_flat_and_invalid_json(root):
    f = root / "cub" / "test.json"
    f.write_text(json.dumps({"a.jpg": 1, "b.jpg": {"label": 2}}, indent=1))
    with pytest.raises(BenchmarkDataError, match=r"test.json:3: value for 'b.jpg' must be an integer"):
        read_fgvc_json(f)
    f.write_text(json.dumps([["a.jpg", 1]]))
    with pytest.raises(BenchmarkDataError, match=r"test.json:1: expected a flat JSON object"):
        read_fgvc_json(f)
    f.write_text('{\n "a.jpg": 1,\n "b.jpg" 2\n}')
    with pytest.raises(BenchmarkDataError, match=r"test.json:3: invalid JSON"):
        load_fgvc(root, "cub")


def test_validate(root):
    rep = validate_fgvc(root, ["cub", "dogs", "flowers"])
    assert rep.ok and len(rep.warnings) == 9                       # tiny sizes vs VPT's
    assert [t.counts["test"] for t in rep.tasks] == [6, 6, 6]
    assert validate_fgvc(root, ["cub"], check_sizes=False).warnings == []
    bad = root / "stanford_dogs" / "Images"
    victim = sorted(bad.rglob("test_0002.jpg"))[0]
    victim.unlink()
    (root / "cub" / "train.json").unlink()
    rep = validate_fgvc(root, ["cub", "dogs", "cars"])
    errs = rep.errors
    assert "cub/train.json: split file missing" in errs[0]
    assert "stanford_dogs/test.json:4: entry" in errs[1] and "listed but missing" in errs[1]
    assert "dataset folder missing for 'stanford_cars'" in errs[2]
    assert "cub" in rep.format() and "ERROR" in rep.format()


def test_wrong_root(root, tmp_path):
    vt = make_tiny_vtab(tmp_path / "vt", {"dtd": 2}, sizes=(2, 1, 1))
    with pytest.raises(BenchmarkDataError, match="looks like a VTAB-1k dump"):
        validate_fgvc(vt)
    with pytest.raises(BenchmarkDataError, match="single FGVC dataset folder"):
        load_fgvc(root / "cub", "cub")
