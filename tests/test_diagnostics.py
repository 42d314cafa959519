"""sds_vision.diagnostics against dense numpy / torch reference computations."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sds_vision.diagnostics import (
    GradientDiagnostics,
    condition_number,
    cosine,
    effective_rank,
    layer_diagnostics,
    stable_rank,
)
from sds_vision.layers import LoRALinear, SDSLoRALinear


def _with_spectrum(rows, cols, sv, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sv))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sv))))
    return torch.tensor(u @ np.diag(sv) @ v.T)


def test_effective_stable_rank_and_condition_number_of_known_spectrum():
    sv = np.array([4.0, 2.0, 1.0, 1.0, 0.5])
    m = _with_spectrum(9, 7, sv)
    p = sv / sv.sum()
    assert effective_rank(m) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert stable_rank(m) == pytest.approx((sv ** 2).sum() / 16.0, rel=1e-9)
    assert condition_number(m, rank=5) == pytest.approx(8.0, rel=1e-9)
    assert condition_number(m, rank=2) == pytest.approx(2.0, rel=1e-9)
    assert condition_number(m) > 1e12  # 7 columns but rank 5: numerically singular
    # flat spectrum of rank k -> effective rank k; rank 1 -> 1; zero -> 0
    assert effective_rank(_with_spectrum(8, 6, np.ones(3))) == pytest.approx(3.0, rel=1e-9)
    assert effective_rank(_with_spectrum(8, 6, np.array([2.0]))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4, 3)) == 0.0 and stable_rank(torch.zeros(4, 3)) == 0.0
    assert math.isinf(condition_number(torch.zeros(4, 3)))


def test_cosine_of_known_update():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert math.isnan(cosine(a, torch.zeros(2, 2)))


def _layer(cls, d_in=10, d_out=12, rank=3, slices=None, seed=0, **kw):
    torch.manual_seed(seed)
    layer = cls(nn.Linear(d_in, d_out), rank, alpha=6.0, slices=slices, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("slices", [None, [(0, 4), (8, 12)]])
def test_layer_diagnostics_against_dense_reference(slices):
    layer = _layer(SDSLoRALinear, slices=slices)
    x, dy = torch.randn(3, 5, 10), torch.randn(3, 5, 12)
    layer(x).backward(dy)
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    with torch.no_grad():  # a plain SGD step, so dA, dB are known
        for p in (layer.lora_A, layer.lora_B):
            p -= 0.1 * p.grad
    da, db = layer.lora_A.detach() - a0, layer.lora_B.detach() - b0
    res = layer_diagnostics(layer, x, dy, da, db)
    g = torch.einsum("bto,bti->oi", dy, x).double()
    s = layer.scaling
    spans = slices or [(0, 12)]
    assert list(res) == ([f"[{lo}:{hi}]" for lo, hi in spans] if slices else [""])
    for j, ((lo, hi), key) in enumerate(zip(spans, res)):
        a, b = (a0[j], b0[j]) if slices else (a0, b0)
        dA_j, dB_j = (da[j], db[j]) if slices else (da, db)
        gA, gB = (layer.lora_A.grad[j], layer.lora_B.grad[j]) if slices else \
            (layer.lora_A.grad, layer.lora_B.grad)
        ref_update = (s * (dB_j @ a + b @ dA_j)).double().numpy().ravel()
        gj = -g[lo:hi].numpy().ravel()
        ref_cos = gj @ ref_update / np.linalg.norm(gj) / np.linalg.norm(ref_update)
        sv_a = np.linalg.svd(a.double().numpy(), compute_uv=False)
        m = res[key]
        assert m["cos_update"] == pytest.approx(ref_cos, rel=1e-6)
        assert m["cond_A"] == pytest.approx(sv_a[0] / sv_a[2], rel=1e-6)
        assert m["srank_A"] == pytest.approx((sv_a ** 2).sum() / sv_a[0] ** 2, rel=1e-6)
        sv_g = np.linalg.svd(gB.double().numpy(), compute_uv=False)
        p = sv_g / sv_g.sum()
        assert m["erank_gB"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert 1.0 <= m["erank_gA"] <= 3.0 + 1e-9
        assert m["cos_update"] > 0  # SGD on the SDS gradients is a descent direction for delta
        delta = (s * b.double() @ a.double()).numpy()
        sv_d = np.linalg.svd(delta, compute_uv=False)
        assert m["cond_delta"] == pytest.approx(sv_d[0] / sv_d[2], rel=1e-5)


def test_sds_factor_gradient_effective_rank_exceeds_lora_on_ill_conditioned_factor():
    """docs/method.md section 1: LoRA's dB = s G A^T carries A's singular values; SDS's does not."""
    d_in, d_out, r = 40, 32, 6
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    lora, sds = LoRALinear(base, r), SDSLoRALinear(base, r)
    a = _with_spectrum(r, d_in, np.logspace(0, -3, r)).float()  # condition number 1000
    b = _with_spectrum(d_out, r, np.logspace(0, -2, r), seed=1).float()
    x, dy = torch.randn(64, d_in), torch.randn(64, d_out)
    er = {}
    for name, layer in (("lora", lora), ("sds", sds)):
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer(x).backward(dy)
        er[name] = (effective_rank(layer.lora_A.grad), effective_rank(layer.lora_B.grad))
    # G is a random full-rank matrix: through orthonormal bases the r directions stay
    # comparable (effective rank close to r); through A^T / B^T they collapse to ~1-2.
    assert er["sds"][0] >= er["lora"][0] + 1.5 and er["sds"][1] >= er["lora"][1] + 1.5
    assert er["sds"][1] > 0.7 * r


class _Net(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.l1 = cls(nn.Linear(6, 5), 2)
        self.l2 = cls(nn.Linear(5, 9), 2, slices=[(0, 3), (6, 9)])
        with torch.no_grad():
            self.l1.lora_B.normal_()

    def forward(self, x):
        self.h = torch.tanh(self.l1(x))
        self.h.retain_grad()
        self.y = self.l2(self.h)
        self.y.retain_grad()
        return self.y


@pytest.mark.parametrize("cls", [LoRALinear, SDSLoRALinear])
def test_callback_captures_g_equal_to_dy_t_x_by_hand(tmp_path, cls):
    torch.manual_seed(0)
    net = _Net(cls)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    rows = []
    ctx = SimpleNamespace(model=net, optimizer=opt, step=0, epoch=0, out_dir=tmp_path,
                          is_main=True, log=rows.append)
    cb = GradientDiagnostics(every=2, first=False)
    cb.on_train_start(ctx)
    expected = {}
    for step in range(1, 5):
        x = torch.randn(3, 4, 6)
        # the hooks exist only around logging steps
        armed = bool(net.l1._forward_hooks)
        assert armed == (step % 2 == 0)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        ctx.step = step
        # G by hand: dY^T X of each layer, from retained tensors
        g1 = torch.einsum("bto,bti->oi", net.h.grad * (1 - net.h ** 2), x)
        g2 = torch.einsum("bto,bti->oi", net.y.grad, net.h)
        a1, b1 = net.l1.lora_A.detach().clone(), net.l1.lora_B.detach().clone()
        cb.on_before_optimizer_step(ctx)
        if armed:
            assert_close(cb._before["l1"][0], g1)
            assert_close(cb._before["l2"][0], g2)
            expected[step] = (g1, a1, b1)
        assert not net.l1._forward_hooks  # removed before the optimizer step
        opt.step()
        cb.on_after_optimizer_step(ctx)
    cb.on_train_end(ctx)
    assert sorted({r["step"] for r in cb.rows}) == [2, 4]
    assert [r["layer"] for r in rows if r["kind"] == "layer_diagnostics"][:3] == \
        ["l1", "l2[0:3]", "l2[6:9]"]
    assert (tmp_path / "diagnostics.png").stat().st_size > 1000
    json.dumps(rows)  # JSON-serialisable (inf -> None)
    # the logged cosine matches a dense recomputation from the captured G
    g1, a1, b1 = expected[4]
    da, db = net.l1.lora_A.detach() - a1, net.l1.lora_B.detach() - b1
    s = net.l1.scaling
    ref = cosine(-g1, s * (db @ a1 + b1 @ da))
    got = [r for r in cb.rows if r["step"] == 4 and r["layer"] == "l1"][0]["cos_update"]
    assert got == pytest.approx(ref, rel=1e-6)


def test_callback_through_engine_fit(tmp_path):
    """End to end through sds_vision.train.fit on a tiny ViT: rows in diagnostics.jsonl + PNG."""
    train = pytest.importorskip("sds_vision.train")
    from torch.utils.data import TensorDataset

    class DS(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, int(y)

    torch.manual_seed(0)
    ds = DS(torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16,)))
    cfg = train.TrainConfig(model="test_vit", method="sds_lora", epochs=1, batch_size=4,
                            adapter={"rank": 2, "targets": ["q", "v", "fc2"]},
                            img_size=16, num_workers=0, out_dir=str(tmp_path / "run"),
                            progress=False, warmup_epochs=0,
                            extra_timm_kwargs=dict(depth=1, patch_size=8))
    cb = GradientDiagnostics(every=2)
    train.fit(cfg, ds, ds, 2, callbacks=[cb])
    rows = [json.loads(line) for line in (tmp_path / "run" / "diagnostics.jsonl").open()]
    rows = [r for r in rows if r.get("kind") == "layer_diagnostics"]
    assert sorted({r["step"] for r in rows}) == [1, 2, 4]
    assert {r["layer"] for r in rows} == {"blocks.0.attn.qkv[0:64]", "blocks.0.attn.qkv[128:192]",
                                          "blocks.0.mlp.fc2"}
    assert all(r["cos_update"] is not None and -1 <= r["cos_update"] <= 1
               for r in rows if r["step"] > 1)
    assert (tmp_path / "run" / "diagnostics.png").exists()
