"""Every registered method through the public contract (build, train, merge, files, peft),
on the three families; the peers (peft's DoRA and PiSSA) as references."""

import copy

import pytest
import timm
import torch
from conftest import TINY, unit_layer_scale
from test_train import TRAIN, VAL  # separable 3-class 32 px images
from torch import nn
from torch.testing import assert_close

from sds_vision import (
    METHODS,
    AdapterConfig,
    adapter_modules,
    create_sds_model,
    export_peft_adapter,
    load_adapter,
    load_sds_model,
    merge_adapters,
    save_adapter,
)
from sds_vision.methods import low_rank_methods
from sds_vision.methods.dora import DoRALinear
from sds_vision.train import TrainConfig
from sds_vision.train.engine import param_groups

LOW_RANK = low_rank_methods()
FAMILIES = ("vit", "swin", "convnext")
X = torch.randn(2, 3, 32, 32)


def _targets(family):
    return ["q", "v"] if family in ("vit", "swin") else None  # fused slices where there are


def _model(method, family="vit", seed=0, **kw):
    torch.manual_seed(seed)  # same seed -> same random "pretrained" backbone
    name, kwargs = TINY[family]
    model = create_sds_model(name, num_classes=5, method=method,
                             **{"rank": 2, "targets": _targets(family), **kwargs, **kw})
    unit_layer_scale(model)
    return model.eval()


def _plain(family, seed=0):
    torch.manual_seed(seed)
    name, kwargs = TINY[family]
    model = timm.create_model(name, num_classes=5, **kwargs)
    unit_layer_scale(model)
    return model.eval()


def _train_a_bit(model, std=0.3):
    """Move every adapter tensor that trains (and the head) well away from its init."""
    with torch.no_grad():
        for _, mod in adapter_modules(model):
            for name, p in mod.named_parameters():
                if p.requires_grad:
                    p.add_(std * torch.randn_like(p) * (p.abs().mean() if name ==
                                                        "lora_magnitude" else 1.0))
        model.get_classifier().weight.normal_()


def test_registry_lists_every_method_once():
    assert set(LOW_RANK) == {"sds_lora", "sds_lora_bases", "lora", "lora_plus", "precond_lora",
                             "dora", "pissa"}
    assert set(METHODS) == set(LOW_RANK) | {"full", "linear"}
    for name, spec in METHODS.items():
        assert spec.name == name and spec.label and spec.summary
        if spec.low_rank:
            assert spec.layer_class().__module__.endswith(spec.layer.split(":")[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", LOW_RANK)
def test_build_train_merge(family, method):
    model, plain = _model(method, family), _plain(family)
    with torch.no_grad():  # the initial output is the base model's, for every method
        assert_close(model(X), plain(X), rtol=1e-4, atol=1e-4)
    mods = dict(adapter_modules(model))
    assert mods and all(isinstance(m.scaling, float) for m in mods.values())
    # one optimizer step changes the adapters and nothing frozen
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {n: m.adapter_state() for n, m in mods.items()}
    for _ in range(2):  # step 1 may move B only (B = 0 init): the second moves A as well
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), torch.tensor([0, 1])).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    moved = [n for n, m in mods.items() if not torch.equal(m.lora_B, before[n]["lora_B"])]
    assert len(moved) == len(mods)
    assert any(not torch.equal(m.lora_A, before[n]["lora_A"]) for n, m in mods.items())
    model.eval()
    _train_a_bit(model)
    merged = merge_adapters(model)
    assert not any(True for _ in adapter_modules(merged))
    with torch.no_grad():
        assert_close(merged(X), model(X), rtol=1e-4, atol=1e-4)
        assert (merged(X) - plain(X)).abs().max() > 1e-2
    plain_w = dict(plain.named_parameters())
    for name, mod in mods.items():
        dense = mod.delta_weight()
        assert dense.shape == mod.weight.shape and dense.dtype == torch.float32
        assert_close(mod.pretrained_weight(), plain_w[name + ".weight"].float())
        assert_close(mod.pretrained_weight() + dense, mod.merged_weight(), rtol=1e-5, atol=1e-5)
        assert type(merged.get_submodule(name)) is nn.Linear
        if mod.slices:  # rows outside the slices (k of q, k, v) are never touched
            gap = dense[mod.slices[0][1]:mod.slices[1][0]]
            assert gap.numel() and torch.equal(gap, torch.zeros_like(gap))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", LOW_RANK)
def test_save_load_round_trip_and_peft_export(tmp_path, family, method):
    peft = pytest.importorskip("peft")
    trained = _model(method, family)
    _train_a_bit(trained)
    save_adapter(trained, tmp_path / "adapter")
    rebuilt = _model(method, family)
    with torch.no_grad():
        assert (rebuilt(X) - trained(X)).abs().max() > 1e-3
        load_adapter(rebuilt, tmp_path / "adapter")
        assert_close(rebuilt(X), trained(X))
        torch.manual_seed(0)
        again = load_sds_model(tmp_path / "adapter").eval()
        unit_layer_scale(again)
        assert_close(again(X), trained(X), rtol=1e-4, atol=1e-5)
    export_peft_adapter(trained, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(_plain(family), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_close(peft_model(X), trained(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", LOW_RANK)
def test_rslora_scaling_for_every_method(method):
    model = _model(method, rank=4, alpha=8.0, rslora=True, targets=["fc1"])
    assert {m.scaling for _, m in adapter_modules(model)} == {4.0}
    model = _model(method, rank=4, alpha=8.0, targets=["fc1"])
    assert {m.scaling for _, m in adapter_modules(model)} == {2.0}


def test_method_options_reach_the_layers():
    opts = dict(lora_plus=dict(lora_plus_ratio=4.0), pissa=dict(pissa_svd="randomized",
                                                                pissa_niter=2),
                sds_lora_bases=dict(bases_refresh="every", bases_startup="random"),
                sds_lora=dict(basis="qr"))
    for method, kw in opts.items():
        model = _model(method, adapter=AdapterConfig(**kw))
        for _, mod in adapter_modules(model):
            for k, v in kw.items():
                assert getattr(mod, k) == v, (method, k)
        assert model.sds_config.adapter == AdapterConfig(**kw, rank=2, targets=("q", "v"))


def test_lora_plus_optimizer_groups():
    for ratio in (16.0, 4.0):
        model = _model("lora_plus", adapter=AdapterConfig(lora_plus_ratio=ratio))
        groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3))}
        b_params = {id(m.lora_B) for _, m in adapter_modules(model)}
        a_params = {id(m.lora_A) for _, m in adapter_modules(model)}
        scaled = groups[f"body_lr_x{ratio:g}"]
        assert {id(p) for p in scaled["params"]} == b_params
        assert scaled["lr"] == pytest.approx(ratio * 1e-3)
        assert {id(p) for p in groups["body"]["params"]} == a_params
        assert groups["body"]["lr"] == 1e-3
    lora = {g["name"] for g in param_groups(_model("lora"), TrainConfig(lr=1e-3))}
    assert lora == {"body", "head", "head_no_wd"}


# --- DoRA against peft ------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["fc1", "proj"], ["q", "v"]])
def test_dora_equals_peft_dora(targets):
    peft = pytest.importorskip("peft")
    ours = _model("dora", targets=targets)
    _train_a_bit(ours)
    mods = dict(adapter_modules(ours))
    theirs = peft.get_peft_model(_plain("vit"), peft.LoraConfig(
        r=2 * (2 if targets == ["q", "v"] else 1), lora_alpha=2 * (2 if targets == ["q", "v"]
                                                                    else 1),
        target_modules=list(mods), use_dora=True, init_lora_weights=False))
    # the same factors (fused slices as one block-structured LoRA), magnitude and head
    with torch.no_grad():
        for name, mod in mods.items():
            layer = theirs.base_model.model.get_submodule(name)
            a, b = mod.peft_lora()
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            layer.lora_magnitude_vector["default"].weight.copy_(
                mod.peft_extra()["lora_magnitude_vector"])
        theirs.base_model.model.head.load_state_dict(ours.head.state_dict())
    x, x2 = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        y_ours, y_theirs = ours(x), theirs(x2)
        assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    assert (y_ours - _plain("vit")(X)).abs().max() > 1e-2
    # gradients too: magnitude, and A/B (the norm is detached in both)
    w = torch.randn_like(y_ours)
    (y_ours * w).sum().backward()
    (y_theirs * w).sum().backward()

    def close(a, b):  # float32 rounding of two evaluation orders, relative to the scale
        assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())

    close(x.grad, x2.grad)
    for name, mod in mods.items():
        layer = theirs.base_model.model.get_submodule(name)
        mag_grad = layer.lora_magnitude_vector["default"].weight.grad
        a_grad = layer.lora_A["default"].weight.grad.view_as(mod.lora_A)
        if mod.slices:
            mag_grad = mag_grad[mod.slice_rows].view_as(mod.lora_magnitude)
        close(mod.lora_magnitude.grad, mag_grad)
        close(mod.lora_A.grad, a_grad)
        assert mod.lora_A.grad.abs().max() > 0 and mod.lora_magnitude.grad.abs().max() > 0


def test_dora_equals_peft_dora_under_bf16_autocast():
    """The magnitude / norm scale stays float32 under autocast, as in peft: a 0.2 % magnitude
    change (below bf16's spacing near 1) is not rounded away before it is applied, so the
    bf16 outputs agree with peft's except for the last bit of a few (summation order)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    ours = DoRALinear(lin, 4, 4.0)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.01)
        ours.lora_magnitude.mul_(1.002)
    plain = nn.Sequential(nn.Linear(64, 48))
    plain[0].load_state_dict(lin.state_dict())
    theirs = peft.get_peft_model(plain, peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = theirs.base_model.model[0]
    a, b = ours.peft_lora()
    x = torch.randn(512, 64)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        layer.lora_magnitude_vector["default"].weight.copy_(
            ours.peft_extra()["lora_magnitude_vector"])
        assert_close(ours(x), theirs(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ours, y_theirs, y_base = ours(x), theirs(x), lin(x)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    assert (y_ours != y_base).float().mean() > 0.5
    assert (y_ours != y_theirs).float().mean() < 0.1  # 0.37 with the scale rounded to bf16
    assert_close(y_ours, y_theirs, rtol=0, atol=2 ** -6)


# --- PiSSA --------------------------------------------------------------------------------
def test_pissa_factors_equal_peft_pissa_and_output_equals_base():
    peft = pytest.importorskip("peft")
    ours = _model("pissa", targets=["fc1", "proj"])
    theirs = peft.get_peft_model(_plain("vit"), peft.LoraConfig(
        r=2, lora_alpha=2, target_modules=[n for n, _ in adapter_modules(ours)],
        init_lora_weights="pissa"))
    for name, mod in adapter_modules(ours):
        layer = theirs.base_model.model.get_submodule(name)
        assert_close(mod.lora_A, layer.lora_A["default"].weight)
        assert_close(mod.lora_B, layer.lora_B["default"].weight)
        assert_close(mod.weight, layer.base_layer.weight)  # the residual
        assert (mod.weight - _plain("vit").get_submodule(name).weight).abs().max() > 1e-2
    with torch.no_grad():
        assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-5)
        assert_close(ours(X), _plain("vit")(X), rtol=1e-4, atol=1e-5)


def test_pissa_randomized_svd_and_rebuild_from_the_adapter_file(tmp_path):
    from safetensors.torch import save_file
    kw = dict(adapter=AdapterConfig(pissa_svd="randomized", pissa_niter=2))
    ours = _model("pissa", **kw)
    with torch.no_grad():
        assert_close(ours(X), _plain("vit")(X), rtol=1e-4, atol=1e-5)
    for _, mod in adapter_modules(ours):  # close to the exact principal part
        w = mod._slice_rows(mod.pretrained_weight())
        exact = torch.linalg.svdvals(w)[..., :2]
        got = torch.linalg.svdvals(mod.scaling * mod.pissa_B0 @ mod.pissa_A0)[..., :2]
        assert_close(got, exact, rtol=0.2, atol=0.0)
    _train_a_bit(ours)
    save_adapter(ours, tmp_path / "a")
    # the same W0 from a file, but another RNG state: another randomized SVD
    weights = tmp_path / "w0.safetensors"
    save_file(_plain("vit").state_dict(), str(weights))
    torch.manual_seed(123)
    rebuilt = create_sds_model("test_vit", num_classes=5, method="pissa", rank=2, img_size=32,
                               targets=["q", "v"], checkpoint_path=weights, **kw).eval()
    pairs = list(zip(dict(adapter_modules(rebuilt)).values(), dict(adapter_modules(ours)).values()))
    assert not torch.equal(pairs[0][0].pissa_A0, pairs[0][1].pissa_A0)
    load_adapter(rebuilt, tmp_path / "a")  # the file's initial factors win
    torch.manual_seed(456)
    again = load_sds_model(tmp_path / "a", checkpoint_path=weights).eval()
    with torch.no_grad():
        assert_close(rebuilt(X), ours(X), rtol=1e-4, atol=1e-5)
        assert_close(again(X), ours(X), rtol=1e-4, atol=1e-5)
    for a, b in pairs:
        assert torch.equal(a.pissa_A0, b.pissa_A0) and torch.equal(a.lora_B, b.lora_B)
        assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)  # the residual


def test_pissa_load_state_dict_keeps_the_residual_consistent():
    a = _model("pissa")
    b = copy.deepcopy(a)
    for _, mod in adapter_modules(b):  # as if b had drawn other initial factors
        mod._rebase(mod.pissa_A0 * 1.5, mod.pissa_B0 * 0.5)
        assert_close(mod.pretrained_weight(), dict(adapter_modules(a))[_].pretrained_weight(),
                     rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (b(X) - a(X)).abs().max() > 1e-3  # A, B still a's: the function differs
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora_" in k or "pissa" in k},
                      strict=False)  # what a checkpoint restore does
    for (_, ma), (_, mb) in zip(adapter_modules(a), adapter_modules(b)):
        assert_close(mb.weight, ma.weight, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert_close(b(X), a(X), rtol=1e-5, atol=1e-5)


# --- sds_lora_bases through the engine: start-up, refresh schedule, exact resume ----------
def _bases_cfg(tmp_path, name="run", refresh="every", startup="authors", **kw):
    base = dict(model="test_vit", method="sds_lora_bases", epochs=4, batch_size=16, lr=3e-2,
                img_size=32, num_workers=0, warmup_epochs=1, out_dir=str(tmp_path / name),
                log_every_steps=1, progress=False, threads=1,
                adapter={"rank": 2, "targets": ["q", "v"], "bases_refresh": refresh,
                         "bases_startup": startup})
    return TrainConfig(**{**base, **kw})


def test_bases_refresh_schedule():
    from sds_vision.methods.sds_lora_bases import BasesSchedule
    layer = create_sds_model("test_vit", num_classes=3, method="sds_lora_bases", rank=2,
                             img_size=32, bases_startup="random")
    sched = BasesSchedule.for_model(layer)
    steps = [t for t in range(1, 101) if sched.refreshes_after(t, 100)]
    # every step in the first fifth, every 2nd in the second, ..., every 5th in the last
    assert steps == list(range(1, 20)) + list(range(20, 40, 2)) + [42, 45, 48, 51, 54, 57] + \
        [60, 64, 68, 72, 76] + [80, 85, 90, 95]  # 100 // 20 + 1 = 6 does not divide 100
    sched.startup = "authors"  # the SVD split at step 10 comes first
    assert [t for t in range(1, 15) if sched.refreshes_after(t, 100)] == [11, 12, 13, 14]
    sched.refresh = "every"
    assert [t for t in range(1, 15) if sched.refreshes_after(t, 100)] == [11, 12, 13, 14]


class _Watch:
    """Records the state the method's own callback leaves (it runs before user callbacks)."""

    def __init__(self):
        self.rows = {}

    def on_train_start(self, ctx):
        mods = dict(adapter_modules(ctx.model))
        self.rows["start"] = dict(
            zero=all(m.lora_A.abs().max() == 0 and m.lora_B.abs().max() == 0
                     for m in mods.values()),
            state=len(ctx.optimizer.state), head=copy.deepcopy(ctx.model.head.state_dict()),
            bases={n: (m.basis_A.clone(), m.basis_B.clone()) for n, m in mods.items()})

    def on_after_optimizer_step(self, ctx):
        mods = dict(adapter_modules(ctx.model))
        self.rows[ctx.step] = dict(state=len(ctx.optimizer.state), mods={
            n: {k: v.clone() for k, v in m.adapter_state().items()} for n, m in mods.items()})


@pytest.fixture
def short_prephase(monkeypatch):
    """Two SVD resets instead of five: the same code path, a third of the steps."""
    from sds_vision.methods.sds_lora_bases import BasesSchedule
    monkeypatch.setattr(BasesSchedule, "PRE_STEPS", 2 * BasesSchedule.SVD_EVERY)


def test_bases_authors_startup_through_fit(tmp_path, short_prephase):
    from sds_vision.methods.sds_lora_bases import MIN_NORM, signed_qr
    from sds_vision.train import build_model, fit
    cfg = _bases_cfg(tmp_path, refresh="every", startup="authors")
    watch = _Watch()
    fit(cfg, TRAIN, VAL, 3, callbacks=[watch])
    start = watch.rows["start"]
    # after the pre-phase: A = B = 0, the head as it was built, optimizer state cleared,
    # and bases that are no longer the random initial ones
    assert start["zero"] and start["state"] == 0
    fresh = build_model(cfg, 3)
    for k, v in fresh.head.state_dict().items():
        assert torch.equal(start["head"][k], v)
    for name, (p_a, _) in start["bases"].items():
        init = fresh.get_submodule(name)
        assert not torch.allclose(p_a, init.basis_A, atol=1e-3)
        assert_close(p_a @ p_a.mT, torch.eye(2).expand(2, 2, 2), atol=1e-5, rtol=0)
    # step 10: the split. P_A = V^T, A = S V^T / 2 (rows parallel to P_A), state cleared
    assert watch.rows[10]["state"] == 0 and watch.rows[9]["state"] > 0
    for st in watch.rows[10]["mods"].values():
        coef = st["lora_A"] @ st["basis_A"].mT  # = diag(S) / 2
        assert_close(coef, torch.diag_embed(torch.diagonal(coef, dim1=-2, dim2=-1)), atol=1e-5,
                     rtol=0)
        assert_close(st["lora_B"], st["basis_B"] @ coef, atol=1e-5, rtol=1e-4)
    # step 11 on: QR refreshes: the bases are the signed QR of the factors after the step,
    # on every slice whose factors are long enough (the others keep theirs)
    refreshed = 0
    for name, st in watch.rows[11]["mods"].items():
        prev = watch.rows[10]["mods"][name]
        for i in range(2):
            a, b = st["lora_A"][i], st["lora_B"][i]
            if (a.norm(dim=-1) > MIN_NORM).all() and (b.norm(dim=-2) > MIN_NORM).all():
                assert_close(st["basis_A"][i].double(), signed_qr(a.mT).mT, atol=1e-5, rtol=0)
                assert_close(st["basis_B"][i].double(), signed_qr(b), atol=1e-5, rtol=0)
                refreshed += 1
            else:
                assert torch.equal(st["basis_A"][i], prev["basis_A"][i])
    assert refreshed >= 6


def test_bases_run_resumes_exactly(tmp_path, short_prephase):
    from sds_vision.train import fit

    class CrashAt:
        def on_after_optimizer_step(self, ctx):
            if ctx.step == 9:
                raise KeyboardInterrupt  # like a kill: the last checkpoint is step 8

    kw = dict(save_every_steps=2, startup="authors", refresh="every")  # split at 10, QR at 11, 12
    ref = fit(_bases_cfg(tmp_path, "ref", **kw), TRAIN, VAL, 3)
    with pytest.raises(KeyboardInterrupt):
        fit(_bases_cfg(tmp_path, "cut", **kw), TRAIN, VAL, 3, callbacks=[CrashAt()])
    res = fit(_bases_cfg(tmp_path, "cut", resume=True, **kw), TRAIN, VAL, 3)
    for key in ("val_top1", "best_val_top1", "steps"):
        assert res[key] == ref[key], key
    for key in ("val_loss", "train_loss"):
        assert res[key] == pytest.approx(ref[key], abs=1e-6), key
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any(k.endswith("basis_A") for k in a)
    for k in a:
        assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", LOW_RANK)
def test_diagnostics_of_every_method(method):
    """The induced update of delta for any method: first order == exact for a small step,
    and a plain gradient step descends (every method here but DoRA, whose norm is detached)."""
    from sds_vision.diagnostics import layer_diagnostics
    model = _model(method, targets=["q", "v", "fc1"])
    _train_a_bit(model, std=0.1)
    model.train().double()  # float64: a tiny step is not lost to rounding
    x = X.double()
    for name, mod in adapter_modules(model):
        model.zero_grad()
        grabbed = {}

        def grab(m, inputs, out, d=grabbed):
            d["x"] = inputs[0]
            out.register_hook(lambda g, d=d: d.update(dy=g))

        hook = mod.register_forward_hook(grab)
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        hook.remove()
        assert grabbed["dy"].abs().max() > 0
        state = mod.adapter_state()
        with torch.no_grad():
            for _, p in mod.named_parameters():
                if p.requires_grad:
                    p -= 1e-6 * p.grad  # small: the second-order term s dB dA vanishes
        res = layer_diagnostics(mod, grabbed["x"], grabbed["dy"], mod.lora_A - state["lora_A"],
                                mod.lora_B - state["lora_B"], state_before=state)
        for metrics in res.values():
            assert metrics["cos_update"] == pytest.approx(metrics["cos_update_exact"], abs=1e-4)
            if method != "dora":
                assert metrics["cos_update"] > 0, (name, metrics)
            assert all(v == v for v in metrics.values())  # no NaN
