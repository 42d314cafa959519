"""VTAB-1k reader, aliases, validation errors and the uint8 cache, on tiny generated dumps."""


import numpy as np
import pytest
import torch

from benchmarks.vtab.tiny import make_tiny_fgvc, make_tiny_vtab
from sds_vision.data.cache import (
    CachedDataset,
    DeviceNormalizer,
    Prep,
    cached_split,
    decode_split,
)
from sds_vision.data.validate import SplitSizes, validate_vtab
from sds_vision.data.vtab import (
    VTAB_GROUPS,
    VTAB_TASKS,
    BenchmarkDataError,
    load_vtab_split,
    read_split_lines,
    resolve_task,
    resolve_tasks,
)

TINY = SplitSizes(train800=8, val200=2, train800val200=10, test=6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # varied class counts; "pets" is an alias folder name for oxford_iiit_pet
    return make_tiny_vtab(tmp_path_factory.mktemp("vtab"), {"cifar": 5, "kitti": 4, "pets": 3})


def test_task_table():
    assert len(VTAB_TASKS) == 19
    assert [len(VTAB_GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert resolve_task("sun397").num_classes == 397 and resolve_task("kitti").test_size == 711
    for alias, canon in [("cifar100", "cifar"), ("Pets", "oxford_iiit_pet"),
                         ("clevr-distance", "clevr_dist"), ("retinopathy", "diabetic_retinopathy"),
                         ("smallnorb_elevation", "smallnorb_ele"), ("camelyon", "patch_camelyon")]:
        assert resolve_task(alias).name == canon
    assert len(resolve_tasks("all")) == 19
    assert [t.name for t in resolve_tasks(["specialized", "eurosat", "dtd"])] == \
        ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "dtd"]
    with pytest.raises(BenchmarkDataError, match="unknown VTAB task 'cifar10'"):
        resolve_task("cifar10")


def test_reader(root):
    s = load_vtab_split(root, "oxford_iiit_pet", "train800")   # found via the alias folder
    assert len(s) == 8 and s[0][0] == root / "pets/images/train800/000000.jpg"
    assert s[1][0].suffix == ".png" and [lab for _, lab in s] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert len(load_vtab_split(root, "cifar100", "train800val200")) == 10


def test_validate_ok_with_test_size_warnings(root, capsys):
    rep = validate_vtab(root, ["cifar", "kitti", "pets"], sizes=SplitSizes(8, 2, 10))
    assert rep.ok, rep.errors
    assert len(rep.warnings) == 3 and "6 test examples, expected 711" in " ".join(rep.warnings)
    assert [t.counts["train800"] for t in rep.tasks] == [8, 8, 8]
    text = rep.format()
    assert "oxford_iiit_pet" in text and "0 error(s), 3 warning(s)" in text
    assert validate_vtab(root, ["cifar"], sizes=TINY).warnings == []


def test_validate_default_sizes_are_errors(root):
    rep = validate_vtab(root, ["kitti"])
    assert "train800.txt: 8 examples, expected 800" in rep.errors[0]
    with pytest.raises(BenchmarkDataError, match=r"expected 800 \(and 2 more"):
        rep.raise_if_failed()


def _fresh(tmp_path):
    return make_tiny_vtab(tmp_path / "d", {"dtd": 3, "svhn": 2})


def test_bad_lines(tmp_path):
    r = _fresh(tmp_path)
    f = r / "dtd" / "val200.txt"
    f.write_text("images/val200/000000.jpg 0\n\nimages/val200/000001.png 1 extra\n")
    with pytest.raises(BenchmarkDataError, match=r"val200.txt:3: expected '<image path> <label>'"):
        read_split_lines(f)
    f.write_text("images/val200/000000.jpg\t0\nimages/val200/000001.png x\n")
    with pytest.raises(BenchmarkDataError, match=r"val200.txt:2: label 'x' is not an integer"):
        load_vtab_split(r, "dtd", "val200")
    f.write_text("images/val200/000000.jpg -1\n")
    with pytest.raises(BenchmarkDataError, match=r"val200.txt:1: negative label"):
        read_split_lines(f)


def test_label_out_of_range(tmp_path):
    r = _fresh(tmp_path)
    f = r / "svhn" / "test.txt"
    lines = f.read_text().splitlines()
    lines[3] = lines[3].split()[0] + " 10"                         # svhn has 10 classes
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"svhn/test.txt:4: label 10 out of range"):
        load_vtab_split(r, "svhn", "test")
    rep = validate_vtab(r, ["dtd", "svhn"], sizes=TINY)
    assert len(rep.errors) == 1 and "test.txt:4: label 10 out of range for svhn" in rep.errors[0]


def test_missing_and_undecodable_images(tmp_path):
    r = _fresh(tmp_path)
    (r / "dtd/images/train800/000002.jpg").unlink()
    (r / "dtd/images/test/000003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rep = validate_vtab(r, ["dtd"], sizes=TINY)
    errs = rep.errors
    assert len(errs) == 2
    assert "train800.txt:3: image listed but missing" in errs[0]
    assert "test.txt:4: image" in errs[1] and "cannot be decoded" in errs[1]
    assert rep.tasks[0].counts["test"] == 6
    with pytest.raises(BenchmarkDataError, match="image listed but missing"):
        decode_split(load_vtab_split(r, "dtd", "train800"), Prep(8))
    with pytest.raises(BenchmarkDataError, match="cannot decode image"):
        decode_split(load_vtab_split(r, "dtd", "test"), Prep(8))


def test_missing_folder_split_and_wrong_root(tmp_path):
    r = _fresh(tmp_path)
    (r / "svhn" / "train800val200.txt").unlink()
    rep = validate_vtab(r, ["dtd", "svhn", "eurosat"], sizes=TINY)
    assert any("svhn/train800val200.txt: split file missing" in e for e in rep.errors)
    assert any("task folder missing for 'eurosat'" in e for e in rep.errors)
    with pytest.raises(BenchmarkDataError, match="unknown VTAB task 'imagenet'"):
        validate_vtab(r, ["dtd", "imagenet"])
    with pytest.raises(BenchmarkDataError, match="single VTAB task folder"):
        validate_vtab(r / "dtd", ["dtd"])
    fg = make_tiny_fgvc(tmp_path / "fg", ["cub"])
    with pytest.raises(BenchmarkDataError, match="looks like an FGVC root"):
        validate_vtab(fg, ["dtd"])
    with pytest.raises(BenchmarkDataError, match="not a directory"):
        load_vtab_split(tmp_path / "nope", "dtd", "test")


def test_cache_matches_pil_pipeline(root, tmp_path):
    from PIL import Image
    samples = load_vtab_split(root, "cifar", "test")
    split = decode_split(samples, Prep(24), num_workers=2)
    assert split.images.dtype == torch.uint8 and split.images.shape == (6, 3, 24, 24)
    assert split.labels.tolist() == [lab for _, lab in samples]
    ref = Image.open(samples[1][0]).convert("RGB").resize((24, 24), Image.BICUBIC)
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
    assert torch.equal(split.images[1], ref)                       # bit-identical to PIL
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = DeviceNormalizer(mean, std)
    x, y = CachedDataset(split, norm)[1]
    expect = (ref.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(x, expect)
    assert y == samples[1][1]
    xb, yb = CachedDataset(split, norm).gather(torch.tensor([1, 3]))  # the engine's batch path
    torch.testing.assert_close(xb[0], expect)
    assert yb.tolist() == [samples[1][1], samples[3][1]]
    # device-side resize path (not bit-identical to PIL, but close)
    small = decode_split(samples, Prep(16))
    up = DeviceNormalizer(mean, std, size=24)(small.images[:2])
    assert up.shape == (2, 3, 24, 24) and up.dtype == torch.float32
    # on-disk cache: second call loads the same tensors from the file
    a = cached_split(samples, Prep(24), cache_dir=tmp_path / "c", name="cifar-test")
    assert len(list((tmp_path / "c").glob("cifar-test-*.pt"))) == 1
    b = cached_split(samples, Prep(24), cache_dir=tmp_path / "c", name="cifar-test")
    assert torch.equal(a.images, b.images) and torch.equal(a.images, split.images)
    # a split larger than the disk threshold stays in memory only
    c = cached_split(samples, Prep(24), cache_dir=tmp_path / "d", name="big", max_disk_bytes=10)
    assert torch.equal(c.images, a.images) and not (tmp_path / "d").exists()


def test_cache_fgvc_center_crop():
    from PIL import Image
    img = Image.new("RGB", (40, 20))
    assert Prep(resize=16, crop=14)(img).size == (14, 14)
    with pytest.raises(BenchmarkDataError, match="empty split"):
        decode_split([])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_on_gpu(root):
    from sds_vision.data.cache import fits_on_device
    split = decode_split(load_vtab_split(root, "cifar", "test"), Prep(32))
    assert fits_on_device(split, "cuda")
    gpu = split.to("cuda")
    norm = DeviceNormalizer((0.5,) * 3, (0.5,) * 3, dtype=torch.bfloat16)
    x, _ = CachedDataset(gpu, norm).gather(torch.arange(4))
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16
    cpu = DeviceNormalizer((0.5,) * 3, (0.5,) * 3)(split.images[:4])
    torch.testing.assert_close(x.float().cpu(), cpu, atol=1e-2, rtol=1e-2)


def test_validate_cli_and_dsprites_scale(tmp_path, capsys):
    from PIL import Image

    from sds_vision.data.validate import main
    r = make_tiny_vtab(tmp_path / "d", {"dsprites_ori": 16}, sizes=(8, 2, 6))
    assert main([str(r), "--tasks", "dsprites_orientation", "--expect-sizes", "8", "2", "10"]) == 0
    assert "dsprites_ori" in capsys.readouterr().out
    Image.new("L", (16, 16), 1).save(r / "dsprites_ori/images/test/000000.jpg")  # 0/1 pixels
    rep = validate_vtab(r, ["dsprites_ori"], sizes=TINY)
    assert rep.ok and any("test.txt:1: image max pixel value 1" in w for w in rep.warnings)
    assert main([str(r), "--tasks", "dsprites_ori"]) == 1                # default sizes
    assert "expected 800" in capsys.readouterr().out
    assert main([str(r), "--tasks", "nope"]) == 2
