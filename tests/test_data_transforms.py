"""build_transform against dense reference math; seeding; TransformedDataset + workers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sds_vision.data import (
    DataError,
    ImageFolderSplits,
    TransformedDataset,
    build_transform,
    load_image_rgb,
)
from sds_vision.data.augmentation import parse_crop_scale

# What timm.data.resolve_model_data_config returns for a ViT, at 32 px.
CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.9, "crop_mode": "center"}


def _noise(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalise(img: np.ndarray, cfg: dict = CFG) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).double() / 255.0
    mean, std = torch.tensor(cfg["mean"]).double(), torch.tensor(cfg["std"]).double()
    return ((x - mean[:, None, None]) / std[:, None, None]).float()


def test_eval_constant_colour_is_exact():
    img = np.empty((50, 70, 3), np.uint8)
    img[:] = (10, 128, 250)
    out = build_transform(CFG, train=False)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    c = torch.tensor([10.0, 128.0, 250.0]) / 255
    expected = ((c - torch.tensor(CFG["mean"])) / torch.tensor(CFG["std"]))[:, None, None]
    torch.testing.assert_close(out, expected.expand(3, 32, 32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("interp, flag", [("bicubic", cv2.INTER_CUBIC),
                                          ("bilinear", cv2.INTER_LINEAR)])
def test_eval_matches_resize_shorter_side_then_center_crop(interp, flag):
    img = _noise(50, 70)
    cfg = dict(CFG, interpolation=interp)
    out = build_transform(cfg, train=False)(img)
    # int(32 / 0.9) = 35 on the shorter side: 50x70 -> 35x49, centre crop rows 1:33, cols 8:40
    ref = cv2.resize(img, (49, 35), interpolation=flag)[1:33, 8:40]
    torch.testing.assert_close(out, _normalise(ref), rtol=0, atol=1e-5)
    assert not torch.allclose(out, build_transform(dict(CFG, interpolation="nearest"),
                                                   train=False)(img))


def test_eval_non_square_squash_and_large_crop_pct():
    cfg = dict(CFG, input_size=(3, 24, 32), crop_pct=1.0)
    img = _noise(30, 30)
    out = build_transform(cfg, train=False)(img)
    assert out.shape == (3, 24, 32)  # covers 24x32 (30x30 -> 32x32), crops 24 rows
    ref = cv2.resize(img, (32, 32), interpolation=cv2.INTER_CUBIC)[4:28]
    torch.testing.assert_close(out, _normalise(ref), rtol=0, atol=1e-5)

    squash = build_transform(dict(cfg, crop_mode="squash"), train=False)(img)
    ref = cv2.resize(img, (32, 24), interpolation=cv2.INTER_CUBIC)
    torch.testing.assert_close(squash, _normalise(ref), rtol=0, atol=1e-5)

    small = build_transform(dict(CFG, crop_pct=1.25), train=False)(_noise(64, 64))
    assert small.shape == (3, 32, 32)  # resized to 25 then padded, not an exception


def test_no_aug_train_equals_eval():
    img = _noise()
    a = build_transform(CFG, train=True, aug="none")(img)
    torch.testing.assert_close(a, build_transform(CFG, train=False)(img), rtol=0, atol=0)


def test_train_random_but_seeded():
    img = _noise()
    tf = build_transform(CFG, train=True, seed=3)
    first, second = tf(img), tf(img)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    replay = build_transform(CFG, train=True, seed=3)
    assert torch.equal(replay(img), first) and torch.equal(replay(img), second)
    assert not torch.equal(build_transform(CFG, train=True, seed=4)(img), first)

    torch.manual_seed(11)  # seed=None follows torch.manual_seed
    a = build_transform(CFG, train=True)(img)
    torch.manual_seed(11)
    assert torch.equal(build_transform(CFG, train=True)(img), a)

    tf.set_random_seed(3)
    assert torch.equal(tf(img), first)


def _names(tf) -> list[str]:
    return [type(t).__name__ for t in tf.compose.transforms]


def test_presets_build_the_documented_pipelines():
    assert _names(build_transform(CFG, True)) == ["SmallestMaxSize", "RandomCrop",
                                                  "HorizontalFlip", "Normalize"]  # light
    assert _names(build_transform(CFG, True, aug="strong")) == ["RandomResizedCrop",
                                                                "HorizontalFlip", "Normalize"]
    assert _names(build_transform(CFG, True, aug="none")) == _names(build_transform(CFG, False))
    assert _names(build_transform(CFG, True, hflip=False, color_jitter=0.4)) == [
        "SmallestMaxSize", "RandomCrop", "ColorJitter", "Normalize"]
    light = build_transform(CFG, True)
    assert light.aug == "light" and light.augment and not build_transform(CFG, False).augment
    assert light.describe() == ("resize shorter side to 35 (bicubic) -> random crop 32x32 -> "
                                "horizontal flip p=0.5 -> normalize (mean (0.485, 0.456, 0.406),"
                                " std (0.229, 0.224, 0.225))")
    strong = build_transform(CFG, True, aug="strong", crop_scale=(0.5, 0.9), hflip=False)
    assert strong.describe().startswith("random resized crop 32x32 (area 0.5-0.9, bicubic) -> "
                                        "normalize")
    assert strong.compose.transforms[0].scale == (0.5, 0.9)
    assert build_transform(CFG, True, aug="strong").compose.transforms[0].scale == (0.08, 1.0)


def test_light_is_a_random_crop_of_the_eval_resize():
    img = _noise(50, 70)
    # eval resize: shorter side 35 -> 35x49; light takes any 32x32 window of it, maybe flipped
    ref = cv2.resize(img, (49, 35), interpolation=cv2.INTER_CUBIC)
    windows = {(y, x, flip): _normalise(ref[y:y + 32, x:x + 32][:, ::-1].copy() if flip
                                        else ref[y:y + 32, x:x + 32])
               for y in range(4) for x in range(18) for flip in (False, True)}
    tf = build_transform(CFG, True, seed=0)
    seen = set()
    for _ in range(40):
        out = tf(img)
        match = [k for k, w in windows.items() if torch.allclose(out, w, rtol=0, atol=1e-5)]
        assert len(match) >= 1
        seen.update(match)
    assert len(seen) > 10 and {k[2] for k in seen} == {False, True}
    no_flip = build_transform(CFG, True, hflip=False, seed=0)
    for out in (no_flip(img) for _ in range(10)):
        assert any(torch.allclose(out, w, rtol=0, atol=1e-5)
                   for k, w in windows.items() if not k[2])


def test_strong_full_scale_square_crop_is_the_identity():
    # crop_scale (1, 1) + square input + square ratio range leaves only the flip as randomness
    tf = build_transform(CFG, True, aug="strong", crop_scale=(1.0, 1.0), hflip=False)
    tf.compose.transforms[0].ratio = (1.0, 1.0)
    img = _noise(32, 32)
    torch.testing.assert_close(tf(img), _normalise(img), rtol=0, atol=1e-5)


def test_preset_errors():
    with pytest.raises(DataError, match=r"^augmentation 'heavy': unknown, expected one of none, "
                                        r"light, strong$"):
        build_transform(CFG, train=True, aug="heavy")
    with pytest.raises(DataError, match=r"applies to augmentation 'strong' only"):
        build_transform(CFG, train=True, aug="light", crop_scale=(0.5, 1.0))
    with pytest.raises(DataError, match=r"^crop scale \(0.5, 0.2\): need 0 < min <= max <= 1"):
        build_transform(CFG, train=True, aug="strong", crop_scale=(0.5, 0.2))
    assert parse_crop_scale("0.3") == (0.3, 1.0) and parse_crop_scale("0.2, 0.6") == (0.2, 0.6)
    for bad in ("a", "0.1,0.2,0.3"):
        with pytest.raises(DataError, match="crop scale"):
            parse_crop_scale(bad)


def test_config_and_input_errors():
    with pytest.raises(DataError, match=r"^interpolation='hamming': unknown"):
        build_transform(dict(CFG, interpolation="hamming"), train=False)
    with pytest.raises(DataError, match=r"^data_config: missing key\(s\) \['std'\]"):
        build_transform({k: v for k, v in CFG.items() if k != "std"}, train=False)
    with pytest.raises(DataError, match=r"input_size.*expected \(3, H, W\)"):
        build_transform(dict(CFG, input_size=(32, 32)), train=False)
    with pytest.raises(DataError, match=r"crop_mode.*'border'"):
        build_transform(dict(CFG, crop_mode="border"), train=False)
    with pytest.raises(DataError, match=r"^image: expected an HxWx3 uint8"):
        build_transform(CFG, train=False)(np.zeros((8, 8), np.uint8))


@pytest.fixture
def folder(tmp_path):
    # Every image identical, so any difference between outputs comes from augmentation.
    img = _noise(36, 36, seed=5)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    return ImageFolderSplits(tmp_path, val_ratio=0.25)


def test_transformed_dataset(folder):
    ds = TransformedDataset(folder.train, build_transform(CFG, train=False))
    assert len(ds) == 6
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1 and type(y) is int
    ref = build_transform(CFG, train=False)(load_image_rgb(folder.train[5][0]))
    assert torch.equal(x, ref)


def _epoch(ds, seed):
    loader = DataLoader(ds, batch_size=1, num_workers=2,
                        generator=torch.Generator().manual_seed(seed))
    return torch.cat([x for x, _ in loader])


def test_workers_get_distinct_reproducible_augmentations(folder):
    # strong: enough distinct crops that six samples never collide by chance
    ds = TransformedDataset(folder.train, build_transform(CFG, train=True, aug="strong", seed=0))
    out = _epoch(ds, seed=1)
    # Samples 0 and 1 go to different workers; without reseeding both replay seed 0.
    assert not torch.equal(out[0], out[1])
    assert len({tuple(x.flatten()[:64].tolist()) for x in out}) == len(out)
    assert torch.equal(_epoch(ds, seed=1), out)
    assert not torch.equal(_epoch(ds, seed=2), out)
