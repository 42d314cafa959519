"""Smoke test of benchmarks/convergence/run.py --quick: output structure and a real property."""

import json
import re

import pytest

from benchmarks.convergence import regression, run


def test_regression_problem_is_what_it_claims():
    p = regression.Problem(d_out=20, d_in=12, rank=3, n=40)
    w0, x, y = regression.make_problem(p, kappa=100.0)
    import torch
    torch.testing.assert_close(x.T @ x / p.n, torch.eye(p.d_in), atol=1e-5, rtol=0)
    sv = torch.linalg.svdvals((y - x @ w0.T).double().T @ x.double() / p.n)
    assert sv[0] / sv[p.rank - 1] == pytest.approx(100.0, rel=1e-3)
    assert sv[p.rank] / sv[0] < 1e-5  # rank-r target
    # initial loss (delta = 0) is 1 by construction
    assert ((y - x @ w0.T) ** 2).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_quick_run_structure_and_sds_beats_lora_with_sgd(tmp_path):
    res = run.main(["--out", str(tmp_path), "--quick"])
    md = (tmp_path / "convergence.md").read_text()
    assert md == res["markdown"]
    for name in ("regression_steps.png", "regression_curves.png", "vision_train_loss.png",
                 "vision_diagnostics_lora.png", "vision_diagnostics_sds_lora.png",
                 "vision_diagnostics_sds_bases.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    raw = json.loads((tmp_path / "convergence.json").read_text())
    settings = run.QUICK
    methods = settings["reg_methods"]
    assert set(methods) == set(regression.METHODS) and "sds_bases" in methods

    # summary table: one row per method, one "steps / steps" cell per (optimizer, kappa)
    n_cols = len(settings["reg_lrs"]) * len(settings["kappas"])
    for method in methods:
        assert re.search(rf"^\| {method} \|( [\d–]+ / [\d–]+ \|){{{n_cols}}}$", md, re.M), method
    # details table: one row per (optimizer, kappa, method) with the right columns
    rows = [ln for ln in md.splitlines() if re.match(r"\| (sgd|adamw) \| \d+ \| \w+ \| [\d.e-]+", ln)
            and ln.count("|") == 8]
    n_expected = len(settings["reg_lrs"]) * len(settings["kappas"]) * len(methods)
    assert len(rows) == n_expected
    best = {(b["optimizer"], b["kappa"], b["method"]): b for b in raw["regression"]["best"]}
    assert len(best) == n_expected
    assert len(raw["regression"]["runs"]) == sum(
        len(g) for g in settings["reg_lrs"].values()) * len(settings["kappas"]) * len(methods)
    # the authors' start-up counts its pre-phase
    assert best[("sgd", 100, "sds_bases")]["pre_steps"] == 50
    assert best[("sgd", 100, "sds_bases_random")]["pre_steps"] == 0

    # the real property (docs/method.md, section 1): with plain SGD on an ill-conditioned target,
    # SDS-LoRA at its best lr ends far below LoRA at its best lr.
    def final(b):
        return float(b["final_rel_loss"])

    lora, sds = best[("sgd", 100, "lora")], best[("sgd", 100, "sds_lora")]
    assert final(sds) < 0.1 * final(lora), (final(sds), final(lora))
    assert sds["steps_to"]["0.01"] is not None and sds["steps_to"]["0.01"] <= \
        (lora["steps_to"]["0.01"] or 10**9)
    # and the projection updates (section 3) reach 1e-4 with SGD where LoRA does not
    for m in ("precond_lora", "sds_bases_random"):
        assert best[("sgd", 100, m)]["steps_to"]["0.0001"] is not None, m
    assert lora["steps_to"]["0.0001"] is None

    # vision table: one row per method, with mean ± std cells and a gap-closed column
    vis_methods = list(settings["vis_lrs"])
    for method in vis_methods:
        assert re.search(rf"^\| {method} \| [\d.e-]+.* \| [\d,]+ \| \d+ \| [\d.]+ ± [\d.]+ \| "
                         rf"[\d.]+ ± [\d.]+ \|", md, re.M), method
    assert re.search(r"^\| sds_lora \| .* \| -?\d+% \|$", md, re.M)
    vis = raw["vision"]
    assert {r["method"] for r in vis["runs"]} == set(vis_methods)
    assert all(r["curve"] and r["train_loss"] > 0 for r in vis["runs"])
    assert all("cos_update" in r["diagnostics"] for r in vis["runs"] if r["method"] not in
               ("linear", "full"))
    extra = {r["method"]: r["extra_steps"] for r in vis["runs"]}
    assert extra["sds_bases"] == 50 and extra["lora"] == 0 == extra["full"]
