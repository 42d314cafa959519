"""Smoke test of benchmarks/speed/run.py: structure and the deterministic (memory) figures."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "run.py"


def test_speed_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("speed_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick", "--no-peft", "--repeats", "1", "--out", str(tmp_path)])
    assert set(result["step_s"]) == {"full", "lora", "sds_lora"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["times_s"].values())
    # SDS-LoRA saves exactly what LoRA saves for backward (x and X A^T per layer)
    assert abs(result["ratios"]["sds/lora memory"] - 1) < 0.01
    # full fine-tuning keeps AdamW state for every weight: clearly more memory
    assert result["memory_bytes"]["full"] > 1.5 * result["memory_bytes"]["lora"]
    assert result["trainable_params"]["lora"] == result["trainable_params"]["sds_lora"]
    text = (tmp_path / "speed.md").read_text()
    assert "| sds/lora step |" in text and (tmp_path / "speed.png").stat().st_size > 1000
