"""docs/method.md section 2.8 invariants of LoRALinear / SDSLoRALinear against dense reference math."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sds_vision.layers import LoRALinear, SDSLoRALinear, orthonormal_basis
from sds_vision.methods.precond_lora import PrecondLoRALinear
from sds_vision.methods.sds_lora_bases import SDSLoRABasesLinear


def _pair(d_in=24, d_out=18, rank=4, alpha=8.0, slices=None, basis="polar", seed=0):
    """Same base, same random non-zero factors in a LoRA and an SDS-LoRA layer."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    lora = LoRALinear(base, rank, alpha, slices=slices)
    sds = SDSLoRALinear(base, rank, alpha, slices=slices, basis=basis)
    with torch.no_grad():
        lora.lora_B.normal_()
        sds.lora_A.copy_(lora.lora_A)
        sds.lora_B.copy_(lora.lora_B)
    return base, lora, sds


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(g)
    return y, x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def _polar_ref(m, side):
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u @ vh).float()


def _qr_ref(m, side):
    mat = m.double().T if side == "row" else m.double()
    q, r = torch.linalg.qr(mat)
    q = q * torch.sign(torch.diagonal(r))
    return (q.T if side == "row" else q).float()


def _with_singular_values(m, sv):
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ torch.diag(sv) @ vh


@pytest.mark.parametrize("slices", [None, [(0, 6), (12, 18)]])
def test_forward_and_input_grad_equal_lora_and_dense_reference(slices):
    base, lora, sds = _pair(slices=slices)
    x, g = torch.randn(3, 5, 24), torch.randn(3, 5, 18)
    y_l, dx_l, _, _ = _run(lora, x, g)
    y_s, dx_s, _, _ = _run(sds, x, g)
    w = base.weight + lora.delta_weight()
    assert_close(y_s, y_l)
    assert_close(y_s, x @ w.T + base.bias)
    assert_close(dx_s, dx_l)
    assert_close(dx_s, g @ w)
    assert (lora.delta_weight().abs() > 0).any()


@pytest.mark.parametrize("basis,ref", [("polar", _polar_ref), ("qr", _qr_ref)])
def test_factor_grads_equal_dense_reference(basis, ref):
    base, lora, sds = _pair(basis=basis)
    x, g = torch.randn(4, 7, 24), torch.randn(4, 7, 18)
    _, _, da, db = _run(sds, x, g)
    big_g = torch.einsum("bto,bti->oi", g, x)  # G = dY^T X summed over tokens
    s, a, b = sds.scaling, sds.lora_A.detach(), sds.lora_B.detach()
    assert_close(db, s * big_g @ ref(a, "row").T, rtol=1e-4, atol=1e-4)
    assert_close(da, s * ref(b, "col").T @ big_g, rtol=1e-4, atol=1e-4)
    # and they differ from LoRA's, which carry the factors' singular values
    _, _, da_l, db_l = _run(lora, x, g)
    assert not torch.allclose(db, db_l, rtol=1e-2, atol=1e-3)
    assert_close(db_l, s * big_g @ a.T, rtol=1e-4, atol=1e-4)


def test_sliced_factor_grads_per_slice():
    slices = [(0, 6), (12, 18)]
    _, _, sds = _pair(slices=slices)
    x, g = torch.randn(10, 24), torch.randn(10, 18)
    _, _, da, db = _run(sds, x, g)
    s = sds.scaling
    for i, (lo, hi) in enumerate(slices):
        g_i = g[:, lo:hi].T @ x
        a_i, b_i = sds.lora_A.detach()[i], sds.lora_B.detach()[i]
        assert_close(db[i], s * g_i @ _polar_ref(a_i, "row").T, rtol=1e-4, atol=1e-4)
        assert_close(da[i], s * _polar_ref(b_i, "col").T @ g_i, rtol=1e-4, atol=1e-4)


def test_scale_invariance_polar_qr_and_lora_not():
    x, g = torch.randn(16, 24), torch.randn(16, 18)
    grads = {}
    for name, basis in [("polar", "polar"), ("qr", "qr"), ("lora", None)]:
        per_sv = []
        for sv in (torch.tensor([4.0, 2.0, 1.0, 0.5]), torch.tensor([30.0, 3.0, 0.3, 0.03])):
            _, lora, sds = _pair(basis=basis or "polar")
            layer = lora if name == "lora" else sds
            with torch.no_grad():
                layer.lora_A.copy_(_with_singular_values(layer.lora_A, sv))
                layer.lora_B.copy_(_with_singular_values(layer.lora_B, sv.flip(0)))
            _, _, da, db = _run(layer, x, g)
            per_sv.append((da, db))
        grads[name] = per_sv
    # float32 factors with condition number 1e3: invariance holds to ~1e-4 relative
    (da1, db1), (da2, db2) = grads["polar"]
    assert_close(db1, db2, rtol=1e-3, atol=1e-3)
    assert_close(da1, da2, rtol=1e-3, atol=1e-3)
    (da1, db1), (da2, db2) = grads["qr"]
    sv = lambda m: torch.linalg.svdvals(m)  # noqa: E731
    assert_close(sv(db1), sv(db2), rtol=1e-3, atol=1e-3)
    assert_close(sv(da1), sv(da2), rtol=1e-3, atol=1e-3)
    (_, db1), (_, db2) = grads["lora"]
    assert not torch.allclose(sv(db1), sv(db2), rtol=0.1)


def test_zero_b_init_first_step():
    """Standard init (B = 0): dA = 0 exactly, dB = s G Q_A^T; the forward equals the base."""
    torch.manual_seed(1)
    base = nn.Linear(24, 18)
    sds = SDSLoRALinear(base, 4, 4.0)
    x, g = torch.randn(9, 24), torch.randn(9, 18)
    y, _, da, db = _run(sds, x, g)
    assert_close(y, base(x))
    assert torch.equal(da, torch.zeros_like(da))
    q_a = _polar_ref(sds.lora_A.detach(), "row")
    assert_close(db, sds.scaling * (g.T @ x) @ q_a.T, rtol=1e-4, atol=1e-4)
    assert db.abs().max() > 0


def test_rank_deficient_factor_basis_spans_numerical_range():
    torch.manual_seed(2)
    a = torch.randn(4, 2) @ torch.randn(2, 24)  # rank 2 of 4
    q = orthonormal_basis(a[None], "row")[0]
    u, s, vh = torch.linalg.svd(a.double())
    ref = (u[:, :2] @ vh[:2]).float()
    assert_close(q, ref, rtol=1e-4, atol=1e-4)
    assert_close(q @ q.T, (u[:, :2] @ u[:, :2].T).float(), rtol=1e-4, atol=1e-4)  # a projector
    q_qr = orthonormal_basis(a[None], "row", "qr")[0]
    assert torch.isfinite(q_qr).all()
    assert_close(q_qr.T @ q_qr, q.T @ q, rtol=1e-4, atol=1e-4)  # same subspace


def test_ill_conditioned_basis_is_orthonormal_in_float32():
    torch.manual_seed(3)
    a = _with_singular_values(torch.randn(8, 64), torch.logspace(0, -5, 8))
    for basis in ("polar", "qr"):
        q = orthonormal_basis(a[None], "row", basis)[0]
        assert_close(q @ q.T, torch.eye(8), rtol=0, atol=1e-4)
        assert torch.linalg.matrix_rank(q) == 8


def test_input_gradcheck_float64():
    torch.manual_seed(4)
    base = nn.Linear(6, 5).double()
    sds = SDSLoRALinear(base, 2, 3.0)
    sds.double()
    with torch.no_grad():
        sds.lora_B.normal_()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    sds.lora_A.requires_grad_(False)
    sds.lora_B.requires_grad_(False)
    assert torch.autograd.gradcheck(sds, (x,))


def test_sliced_delta_rows_outside_slices_are_exactly_zero():
    _, lora, sds = _pair(slices=[(0, 6), (12, 18)])
    for layer in (lora, sds):
        delta = layer.delta_weight()
        assert torch.equal(delta[6:12], torch.zeros(6, 24))
        assert (delta[:6].abs() > 0).all() and (delta[12:].abs() > 0).all()
        assert delta.dtype == torch.float32 and delta.shape == (18, 24)
    assert lora.lora_A.shape == (2, 4, 24) and lora.lora_B.shape == (2, 6, 4)


def test_scaling_and_init():
    base = nn.Linear(32, 32)
    assert LoRALinear(base, 8, 16).scaling == 2.0
    assert LoRALinear(base, 4, 8, rslora=True).scaling == 4.0
    assert LoRALinear(base, 8).scaling == 1.0
    layer = SDSLoRALinear(base, 8, 16)
    assert torch.equal(layer.lora_B, torch.zeros(32, 8))
    assert layer.lora_A.abs().max() > 0 and layer.lora_A.std() < 1
    assert layer.weight is base.weight and not layer.weight.requires_grad


def test_adapter_params_stay_float32_with_bf16_base_on_cpu():
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = SDSLoRALinear(base, 4, 4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_cpu_autocast_bf16_matches_float32_within_bf16_precision():
    _, lora, sds = _pair()
    x, g = torch.randn(32, 24), torch.randn(32, 18)
    _, dx32, da32, db32 = _run(sds, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xx = x.clone().requires_grad_(True)
        sds.zero_grad()
        y = sds(xx)
    assert y.dtype == torch.bfloat16
    y.backward(g.to(torch.bfloat16))
    assert sds.lora_A.grad.dtype == torch.float32
    assert_close(sds.lora_B.grad, db32, rtol=5e-2, atol=5e-2 * db32.abs().max().item())
    assert_close(sds.lora_A.grad, da32, rtol=5e-2, atol=5e-2 * da32.abs().max().item())


def _ill_conditioned(cls, cond, seed=0):
    """A layer whose B has singular values spread over ``cond`` (1 ... 1/cond)."""
    torch.manual_seed(seed)
    layer = cls(nn.Linear(24, 18), 4, 8.0)
    u, _ = torch.linalg.qr(torch.randn(18, 4))
    v, _ = torch.linalg.qr(torch.randn(4, 4))
    with torch.no_grad():
        layer.lora_B.copy_(u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)),
                                                         4)) @ v)
    return layer


@pytest.mark.parametrize("cls,cond", [(SDSLoRALinear, 1e3), (PrecondLoRALinear, 1e2)])
def test_cpu_autocast_bf16_dA_with_ill_conditioned_B(cls, cond):
    """dA goes through B's transform M_B (entries up to 1/sigma_min): under autocast it must
    be formed from B M_B in float64, not as (dY B) M_B with B rounded to bf16 first."""
    layer = _ill_conditioned(cls, cond)
    x, g = torch.randn(64, 24), torch.randn(64, 18)
    _, _, da32, _ = _run(layer, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    layer.zero_grad()
    y.backward(g.to(torch.bfloat16))
    assert_close(layer.lora_A.grad, da32, rtol=0, atol=2e-2 * da32.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast(dtype):
    _, lora, sds = _pair()
    x, g = torch.randn(32, 24), torch.randn(32, 18)
    _, _, da32, db32 = _run(sds, x, g)
    sds.cuda()
    with torch.autocast("cuda", dtype=dtype):
        y = sds(x.cuda())
    assert y.dtype == dtype and sds.lora_A.dtype == torch.float32
    sds.zero_grad()
    y.backward(g.cuda().to(dtype))
    assert sds.lora_B.grad.dtype == torch.float32
    assert_close(sds.lora_B.grad.cpu(), db32, rtol=5e-2, atol=5e-2 * db32.abs().max().item())
    assert_close(sds.lora_A.grad.cpu(), da32, rtol=5e-2, atol=5e-2 * da32.abs().max().item())


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be"), (dict(rank=13), "rank must be"),
    (dict(rank=2.5), "rank must be"), (dict(rank=2, basis="svd"), "basis must be"),
    (dict(rank=2, slices=[(0, 4), (6, 12)]), "equal length"),
    (dict(rank=2, slices=[(0, 8), (4, 12)]), "disjoint"),
    (dict(rank=2, slices=[(8, 16)]), "disjoint ranges within"),
    (dict(rank=5, slices=[(0, 4)]), "rank must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SDSLoRALinear(nn.Linear(16, 12), **kwargs)


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="adapts nn.Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1), 1)


# --- the other gradient laws (docs/method.md sections 3-5) ---------------------------------
def _dense_g(x, g):
    return torch.einsum("...o,...i->oi", g, x)  # G = dY^T X summed over tokens


@pytest.mark.parametrize("slices", [None, [(0, 6), (12, 18)]])
def test_bases_forward_and_gradients_against_dense_reference(slices):
    torch.manual_seed(5)
    base = nn.Linear(24, 18)
    layer = SDSLoRABasesLinear(base, 4, 8.0, slices=slices)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x, g = torch.randn(3, 5, 24), torch.randn(3, 5, 18)
    y, dx, da, db = _run(layer, x, g)
    s = layer.scaling
    p_a, p_b = layer.bases()
    a, b = layer.factors()
    spans = slices or [(0, 18)]
    w = base.weight.detach().clone()
    for i, (lo, hi) in enumerate(spans):
        # bases are orthonormal, and the delta is s (B P_A + P_B A)
        assert_close(p_a[i] @ p_a[i].T, torch.eye(4), atol=1e-6, rtol=0)
        assert_close(p_b[i].T @ p_b[i], torch.eye(4), atol=1e-6, rtol=0)
        w[lo:hi] += s * (b[i] @ p_a[i] + p_b[i] @ a[i]).detach()
    assert_close(y, x @ w.T + base.bias)
    assert_close(dx, g @ w)
    assert_close(base.weight + layer.delta_weight(), w)
    big_g = _dense_g(x, g)
    for i, (lo, hi) in enumerate(spans):
        ref_db = s * big_g[lo:hi] @ p_a[i].T
        ref_da = s * p_b[i].T @ big_g[lo:hi]
        got_da, got_db = (da[i], db[i]) if slices else (da, db)
        assert_close(got_db, ref_db, rtol=1e-4, atol=1e-4)
        assert_close(got_da, ref_da, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("slices", [None, [(0, 6), (12, 18)]])
def test_precond_gradients_against_dense_reference(slices):
    torch.manual_seed(6)
    base = nn.Linear(24, 18)
    lora = LoRALinear(base, 4, 8.0, slices=slices)
    pre = PrecondLoRALinear(base, 4, 8.0, slices=slices)
    with torch.no_grad():
        lora.lora_B.normal_()
        pre.lora_A.copy_(_with_singular_values(lora.lora_A.view(-1, 4, 24)[0],
                                               torch.tensor([3.0, 1.0, 0.1, 0.01]))
                         .expand_as(pre.lora_A))
        pre.lora_B.copy_(lora.lora_B)
        lora.lora_A.copy_(pre.lora_A)
    x, g = torch.randn(3, 5, 24), torch.randn(3, 5, 18)
    y_l, dx_l, da_l, db_l = _run(lora, x, g)
    y, dx, da, db = _run(pre, x, g)
    assert_close(y, y_l)
    assert_close(dx, dx_l)  # the input gradient is LoRA's
    s = pre.scaling
    big_g = _dense_g(x, g).double()
    a, b = (t.detach().double() for t in pre.factors())
    eye = torch.eye(4, dtype=torch.float64)
    for i, (lo, hi) in enumerate(slices or [(0, 18)]):
        lora_db = s * big_g[lo:hi] @ a[i].T
        lora_da = s * b[i].T @ big_g[lo:hi]
        ref_db = lora_db @ torch.linalg.inv(a[i] @ a[i].T + 1e-6 * eye)
        ref_da = torch.linalg.inv(b[i].T @ b[i] + 1e-6 * eye) @ lora_da
        got_da, got_db = (da[i], db[i]) if slices else (da, db)
        assert_close(got_db.double(), ref_db, rtol=1e-4, atol=1e-4 * ref_db.abs().max().item())
        assert_close(got_da.double(), ref_da, rtol=1e-4, atol=1e-4 * ref_da.abs().max().item())
        lda, ldb = (da_l[i], db_l[i]) if slices else (da_l, db_l)
        assert_close(ldb.double(), lora_db, rtol=1e-4, atol=1e-4)
        # the preconditioner removes A's singular values: dB ~ G A^+ (cond 300 here)
        assert not torch.allclose(got_db, ldb, rtol=0.1, atol=0.1)


def test_precond_step_moves_delta_by_projections():
    """docs/method.md section 3: with full-rank factors (delta -> 0) one plain gradient step
    changes s B A, to first order, by -eta s^2 (G P_A + P_B G)."""
    torch.manual_seed(7)
    layer = PrecondLoRALinear(nn.Linear(20, 16), 3, 3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(40, 20), torch.randn(40, 16)
    _, _, da, db = _run(layer, x, g)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    big_g = _dense_g(x, g).double()
    first_order = layer.scaling * (db.double() @ a + b @ da.double())
    pa = a.T @ torch.linalg.inv(a @ a.T) @ a
    pb = b @ torch.linalg.inv(b.T @ b) @ b.T
    assert_close(first_order, layer.scaling ** 2 * (big_g @ pa + pb @ big_g), rtol=1e-3, atol=1e-3)


def test_refresh_bases_is_the_signed_qr_and_skips_small_factors():
    torch.manual_seed(8)
    layer = SDSLoRABasesLinear(nn.Linear(24, 18), 4, slices=[(0, 6), (12, 18)])
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.lora_B[1, :, 0] = 1e-3  # slice 1 has a short column of B: kept as it is
    old_a, old_b = layer.basis_A.clone(), layer.basis_B.clone()
    layer.refresh_bases()
    a, b = layer.lora_A.detach()[0].double(), layer.lora_B.detach()[0].double()
    qa, ra = torch.linalg.qr(a.T)
    qb, rb = torch.linalg.qr(b)
    assert_close(layer.basis_A[0].double(), (qa * torch.sign(torch.diagonal(ra))).T,
                 rtol=1e-5, atol=1e-6)
    assert_close(layer.basis_B[0].double(), qb * torch.sign(torch.diagonal(rb)),
                 rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.basis_A[1], old_a[1]) and torch.equal(layer.basis_B[1], old_b[1])
    assert not torch.equal(layer.basis_A[0], old_a[0])


def test_bases_update_svd_is_exact():
    torch.manual_seed(9)
    layer = SDSLoRABasesLinear(nn.Linear(30, 20), 3)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    u, sv, vh = layer.update_svd()
    a, b, p_a, p_b = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.basis_A,
                                                     layer.basis_B))
    dense = b @ p_a + p_b @ a
    ref = torch.linalg.svdvals(dense)
    assert_close(sv[0], ref[:3])
    assert_close(u[0].T @ dense @ vh[0].T, torch.diag(ref[:3]), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("cls", [SDSLoRALinear, PrecondLoRALinear])
def test_batched_rxr_work_equals_per_layer_and_makes_one_call(cls, monkeypatch):
    """All layers of one backward share ONE batched factorisation (rxr.py), with the same
    gradients as the per-layer path."""
    from sds_vision.methods import rxr
    torch.manual_seed(10)
    shapes = [(24, 18, None), (18, 18, [(0, 6), (12, 18)]), (18, 40, None)]
    layers = nn.ModuleList(cls(nn.Linear(i, o), 4, slices=sl) for i, o, sl in shapes)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_()

    def grads():
        for m in layers:
            m.zero_grad()
        x = torch.randn(7, 24, generator=torch.Generator().manual_seed(0))
        layers[2](layers[1](layers[0](x) * 0.5 + 0.1)).square().sum().backward()
        return [p.grad.clone() for m in layers for p in (m.lora_A, m.lora_B)]

    name = "eigh" if cls is SDSLoRALinear else "inv_ex"
    calls = []
    real = getattr(torch.linalg, name)
    monkeypatch.setattr(torch.linalg, name, lambda g, *a, **k: calls.append(g.shape) or real(g, *a, **k))
    batched = grads()
    assert calls == [(2 * 4, 4, 4)]  # one call: A and B sides of 4 (layer, slice) pairs
    monkeypatch.setattr(rxr, "register", lambda *a, **k: None)  # per-layer path
    calls.clear()
    per_layer = grads()
    assert len(calls) == 6
    for gb, gp in zip(batched, per_layer):
        assert_close(gb, gp, rtol=1e-6, atol=1e-7)
