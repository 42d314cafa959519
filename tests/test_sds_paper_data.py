"""The SDS-LoRA paper suite's readers on tiny files in each dataset's real on-disk format
(CIFAR-100 pickles, Food-101 JSON, DTD partitions, Stanford Cars .mat, SUN397 partition
01, CUB-200-2011 id tables, RESISC45 folders + torchgeo lists): splits, labels, and
one-line errors naming the file and line of a bad label or a missing image."""

import json
import pickle

import pytest

from benchmarks.vtab import run
from benchmarks.vtab.tiny_sds_paper import make_tiny_sds_paper
from sds_vision.data.benchmarks import get_benchmark
from sds_vision.data.sds_paper import (
    SDS_PAPER_DATASETS,
    load_sds_paper_split,
    resolve_sds_paper,
    resolve_sds_paper_list,
)
from sds_vision.data.validate import main as validate_main
from sds_vision.data.validate import validate_sds_paper
from sds_vision.data.vtab import BenchmarkDataError

try:  # torchvision's Stanford Cars reader (and the tiny .mat writer) need scipy
    import scipy  # noqa: F401
    DATASETS = list(SDS_PAPER_DATASETS)
except ImportError:
    DATASETS = [d for d in SDS_PAPER_DATASETS if d != "stanford_cars"]


@pytest.fixture
def root(tmp_path):
    return make_tiny_sds_paper(tmp_path / "suite", DATASETS)


def test_table_and_names():
    assert {d.name: d.num_classes for d in SDS_PAPER_DATASETS.values()} == {
        "cifar100": 100, "resisc45": 45, "food101": 101, "dtd": 47, "cub200": 200,
        "stanford_cars": 196, "sun397": 397}
    assert resolve_sds_paper("CUB_200_2011").name == "cub200"
    assert resolve_sds_paper("cars").name == "stanford_cars"
    assert [d.name for d in resolve_sds_paper_list("all")] == list(SDS_PAPER_DATASETS)
    bench = get_benchmark("sds_paper")
    assert bench.split_modes == {"final": ("train", "test")} and bench.tasks == list(
        SDS_PAPER_DATASETS)
    with pytest.raises(BenchmarkDataError, match="sds_paper has no split mode 'tune'"):
        bench.mode_splits("tune")
    with pytest.raises(BenchmarkDataError, match="unknown sds_paper dataset 'imagenet'"):
        resolve_sds_paper("imagenet")


def test_every_reader_lists_the_standard_split(root):
    for name in DATASETS:
        tr = load_sds_paper_split(root, name, "train")
        te = load_sds_paper_split(root, name, "test")
        assert (len(tr), len(te)) == (6, 3), name                 # 3 classes x (2, 1)
        assert sorted(set(tr.labels)) == sorted(set(te.labels)) == [0, 1, 2], name
        if name == "cifar100":
            assert tr.pixels.shape == (6, 32, 32, 3) and tr.paths is None
        else:
            assert all(p.is_file() for p in tr.paths + te.paths), name
            assert not set(tr.paths) & set(te.paths), name
    dtd = load_sds_paper_split(root, "dtd", "train")              # train1 + val1
    assert [dtd.locate(i).rsplit("/", 1)[1] for i in (0, 3)] == ["train1.txt:1", "val1.txt:1"]
    sun = load_sds_paper_split(root, "sun397", "train")
    nested = [p for p in sun.paths if "apartment_building" in str(p)]
    assert nested and {sun.labels[sun.paths.index(p)] for p in nested} == {1}  # ClassName order
    cub = load_sds_paper_split(root, "cub200", "test")
    assert cub.locate(0).endswith("CUB_200_2011/images.txt:7")


def test_validation_and_cli(root, capsys):
    rep = validate_sds_paper(root, DATASETS)
    assert rep.ok and [t.counts for t in rep.tasks][0] == {"train": 6, "test": 3}
    assert any("md5" in w and "cifar-100-python/train" in w for w in rep.warnings)
    assert validate_main(["--benchmark", "sds_paper", str(root), "--tasks", *DATASETS]) == 0
    assert "SDS-LoRA paper suite data root" in capsys.readouterr().out


def _first_error(root, name) -> str:
    rep = validate_sds_paper(root, [name])
    assert not rep.ok
    return rep.errors[0]


def test_bad_labels_name_file_and_line(root):
    f = root / "CUB_200_2011" / "image_class_labels.txt"
    lines = f.read_text().splitlines()
    lines[2] = "3 201"
    f.write_text("\n".join(lines) + "\n")
    assert _first_error(root, "cub200").endswith(
        "CUB_200_2011/image_class_labels.txt:3: class '201' out of range 1..200")

    f = root / "dtd" / "dtd" / "labels" / "test1.txt"
    f.write_text(f.read_text().replace("texture1/", "bogus/", 1))
    assert "dtd/labels/test1.txt:2: class 'bogus' has no folder in" in _first_error(root, "dtd")

    f = root / "food-101" / "meta" / "test.json"
    obj = json.loads(f.read_text())
    obj["dish_0"].append(obj["dish_1"][0])                        # listed under another class
    f.write_text(json.dumps(obj, indent=1))
    assert "meta/test.json:4: entry 'dish_1/100007' is listed under class 'dish_0'" in \
        _first_error(root, "food101")

    f = root / "resisc45-test.txt"
    f.write_text(f.read_text().replace("beach_", "lagoon_", 1))
    assert "resisc45-test.txt:2: 'lagoon_008.jpg' names no class folder" in \
        _first_error(root, "resisc45")

    f = root / "SUN397" / "Partitions" / "Testing_01.txt"
    f.write_text("/z/zoo/sun_0.jpg\n" + f.read_text())
    assert "Testing_01.txt:1: class 'zoo' is not in ClassName.txt" in _first_error(root, "sun397")

    f = root / "cifar-100-python" / "test"
    entry = pickle.loads(f.read_bytes())
    entry["fine_labels"][1] = 100
    f.write_bytes(pickle.dumps(entry))
    assert "cifar-100-python/test: entry 1 (fine_labels[1]): label 100 out of range for " \
        "cifar100 (100 classes)" in _first_error(root, "cifar100")


def test_cars_annotations(root):
    if "stanford_cars" not in DATASETS:
        pytest.skip("needs scipy")
    from scipy.io import loadmat, savemat
    f = root / "stanford_cars" / "cars_test_annos_withlabels.mat"
    annos = loadmat(f)["annotations"]
    annos[0, 1]["class"] = 197
    savemat(f, {"annotations": annos})
    assert "cars_test_annos_withlabels.mat: annotation 2 (00008.jpg): class 197 out of " \
        "range 1..196" in _first_error(root, "stanford_cars")


def test_missing_files_and_images(root):
    (root / "CUB_200_2011" / "images.txt").write_text(
        (root / "CUB_200_2011" / "images.txt").read_text())        # unchanged
    victim = load_sds_paper_split(root, "cub200", "train").paths[1]
    victim.unlink()
    err = _first_error(root, "cub200")
    assert "CUB_200_2011/images.txt:2: image listed but missing" in err
    victim = load_sds_paper_split(root, "sun397", "test").paths[0]
    victim.unlink()
    assert "Testing_01.txt:1: image listed but missing" in _first_error(root, "sun397")
    (root / "cifar-100-python" / "meta").unlink()
    assert _first_error(root, "cifar100").endswith(
        "cifar-100-python/meta: CIFAR-100 python pickle missing")
    (root / "cifar-100-python" / "meta").write_bytes(b"not a pickle")
    assert "cannot read as CIFAR-100's python pickle" in _first_error(root, "cifar100")
    (root / "resisc45-train.txt").unlink()
    assert "resisc45-train.txt: RESISC45 split list" in _first_error(root, "resisc45")
    part = root / "SUN397" / "Partitions" / "Training_01.txt"
    part.rename(root / "SUN397" / "Training_01.txt")                # the other accepted place
    assert load_sds_paper_split(root, "sun397", "train").source.parent.name == "SUN397"
    (root / "dtd" / "dtd").rename(root / "dtd_flat")
    (root / "dtd_flat").rename(root / "dtd" / "x")
    (root / "dtd" / "x" / "labels").rename(root / "dtd" / "labels")
    assert "expects the archive unpacked inside" in _first_error(root, "dtd")


def test_dry_run_accepts_the_suite_and_names_problems(root, tmp_path, capsys):
    base = ["--benchmark", "sds_paper", "--data-root", str(root), "--out", str(tmp_path / "r"),
            "--tasks", *DATASETS, "--model", "test_vit", "--no-pretrained", "--dry-run",
            "--methods", "sds_lora", "lora", "full", "linear"]
    assert run.main(base) == 0
    log = capsys.readouterr().out
    assert f"plan: {len(DATASETS) * 4 * 3} runs" in log and "1 seed" not in log
    assert "batch 64 x 4 accumulation step(s) = 256 per update" in log
    assert "schedule: linear to 0, no warm-up" in log and "stepped per step" in log
    assert "targets q,v, rank 8, dropout 0.1, scaling 1.41421 (rsLoRA" in log
    assert "cifar100: sds_lora, lora, linear: lr 0.001, 7 epochs" in log
    assert "none published" in log and "would run sun397 lora seed 3" in log
    victim = load_sds_paper_split(root, "food101", "test").paths[2]
    victim.unlink()
    assert run.main(base) == 2
    err = capsys.readouterr().err
    assert "food-101/meta/test.json:1: entry 'dish_2/100008': image listed but missing" in err
    assert len(err.strip().splitlines()) == 1
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes((root / "food-101/images/dish_0/100000.jpg").read_bytes())
    f = root / "CUB_200_2011" / "image_class_labels.txt"
    lines = f.read_text().splitlines()
    lines[4] = "5 0"
    f.write_text("\n".join(lines) + "\n")
    assert run.main(base) == 2
    assert "image_class_labels.txt:5: class '0' out of range 1..200" in capsys.readouterr().err
    assert run.main([*base[:-1], "--mode", "tune", "--dry-run"]) == 2
    assert "sds_paper has no split mode 'tune'" in capsys.readouterr().err
