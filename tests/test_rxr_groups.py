"""The batched r x r work (rxr.py) only batches the layers of the backward that runs: a graph
left without a backward (another model, an interrupted or diverged step) neither leaks
into it nor breaks it."""

import gc

import torch
from torch import nn
from torch.testing import assert_close

from sds_vision.layers import SDSLoRALinear
from sds_vision.methods import rxr


def _layer(seed: int) -> SDSLoRALinear:
    torch.manual_seed(seed)
    layer = SDSLoRALinear(nn.Linear(12, 10), 3)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _grads(layer: SDSLoRALinear, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad()
    layer(x).square().sum().backward()
    return [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]


def test_an_abandoned_graph_with_non_finite_factors_does_not_break_another_backward(monkeypatch):
    x = torch.randn(5, 12)
    good = _layer(0)
    monkeypatch.setattr(rxr, "register", lambda *a, **k: None)
    expected = _grads(good, x)  # the per-layer path
    monkeypatch.undo()

    diverged = _layer(1)
    with torch.no_grad():
        diverged.lora_A.fill_(float("nan"))
    abandoned = diverged(x).sum()  # its graph stays alive, its backward never runs
    assert torch.isnan(abandoned)
    assert_close(_grads(good, x), expected)  # the NaN member did not break the batch

    del abandoned
    gc.collect()
    _layer(2)(x).sum()  # a forward whose graph is dropped at once
    assert_close(_grads(good, x), expected)
    group = rxr._local.groups[(rxr.Work("polar", good.eps_rel), 3, x.device)]
    assert group.results is not None and len(group.results) == 1  # only the live layer
