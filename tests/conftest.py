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
def _seed():
    torch.manual_seed(0)
