"""Smoke test of benchmarks/speed/run.py: structure and the deterministic (memory) figures."""

import importlib.util
from pathlib import Path

from sds_vision.methods import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "run.py"


def test_speed_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("speed_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick", "--no-peft", "--repeats", "1", "--out", str(tmp_path)])
    assert set(result["step_s"]) == set(METHODS)  # every method of the registry
    assert all(len(v) == 1 and v[0] > 0 for v in result["times_s"].values())
    mem = {m: r["memory"] for m, r in result["ratios_to_lora"].items()}
    # SDS-LoRA, preconditioned LoRA and LoRA+ save exactly what LoRA saves for backward
    # (x and X A^T per layer) and keep the same optimizer state
    for m in ("sds_lora", "precond_lora", "lora_plus"):
        assert abs(mem[m] - 1) < 0.01, m
    assert abs(result["ratios"]["sds/lora memory"] - 1) < 0.01
    # the bases form's forward is a rank-2r LoRA: it saves more than LoRA
    assert mem["sds_lora_bases"] > 1.01
    # full fine-tuning keeps AdamW state for every weight: clearly more memory
    assert result["memory_bytes"]["full"] > 1.5 * result["memory_bytes"]["lora"]
    params = result["trainable_params"]
    assert params["lora"] == params["sds_lora"] == params["sds_lora_bases"] == params["pissa"]
    assert params["dora"] > params["lora"] > params["linear"]
    text = (tmp_path / "speed.md").read_text()
    assert "| sds/lora step |" in text and "| step / LoRA |" in text
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_rxr_profile_quick(tmp_path):
    """benchmarks/speed/rxr.py: one factorisation call per backward instead of one per layer
    and side, counted by the profiler."""
    spec = importlib.util.spec_from_file_location("rxr_run", SCRIPT.parent / "rxr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick", "--out", str(tmp_path)])
    for method, rows in result["methods"].items():
        batched, per_layer = rows["batched"], rows["per_layer"]
        assert batched["factorisations"] == 1, method
        assert per_layer["factorisations"] == 2 * 24, method  # test_vit: 6 blocks x 4 targets
        assert 0 < batched["ops_rxr"] < per_layer["ops_rxr"] / 10
    assert "| sds_lora | batched | 24 | 1 |" in (tmp_path / "rxr.md").read_text()
