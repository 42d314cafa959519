"""Shared fixtures: tiny randomly initialised timm models, offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network from tests

import pytest
import torch

# Tiny configurations of each supported family (random init, CPU-fast).
TINY = {
    "vit": ("test_vit", dict(img_size=32)),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 2),
                                                  num_heads=(1, 2), img_size=32, window_size=4)),
    "convnext": ("test_convnext", dict()),
}


def unit_layer_scale(model: torch.nn.Module) -> None:
    """Random-init ConvNeXt layer-scale gamma is 1e-6, which hides adapters: set it to 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)


def randomize_adapters(model: torch.nn.Module, std: float = 0.5) -> None:
    from sds_vision.layers import adapter_modules
    with torch.no_grad():
        for _, m in adapter_modules(model):
            m.lora_B.normal_(0, std)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 0, and one torch thread: tiny models gain nothing from a second one, and the
    suite's subprocesses (torchrun, shards, workers) would otherwise oversubscribe the cores."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A generated 4-class image folder: 32 train images (4 steps of 8) and 16 val, 32 px."""
    from sds_vision.data import generate_task
    root = tmp_path_factory.mktemp("data")
    generate_task(root, "shapes", 8, 32, 0, "train")
    generate_task(root, "shapes", 4, 32, 0, "val")
    return root / "shapes"
