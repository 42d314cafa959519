"""scripts/gpu_check.sh on a machine without CUDA: it refuses at once, or (--dry) rehearses
every step on the CPU and writes its few, flat outputs."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU, ever
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def test_without_cuda_it_stops_at_once(tmp_path):
    proc = run(tmp_path / "out")
    assert proc.returncode == 2
    assert "no CUDA device is visible" in proc.stderr and "--dry" in proc.stderr
    summary = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert summary["steps"] == [] and summary["environment"]["gpu"] is None
    assert "not measured on a GPU" in (tmp_path / "out/gpu_check.md").read_text()
    assert run(tmp_path / "o2", "--bogus").returncode == 2


@pytest.mark.slow
def test_dry_rehearsal_writes_every_output(tmp_path):
    out = tmp_path / "out"
    proc = run(out, "--dry")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        ("cuda_tests", "ok"), ("cuda_compile", "ok"), ("speed", "ok"), ("throughput", "ok")]
    # few and flat (the device tool returns at most 8 files, 2 folder levels)
    files = sorted(p.name for p in out.rglob("*"))
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "speed.json",
                     "speed.md", "throughput.json", "throughput.md"]
    assert json.loads((out / "speed.json").read_text())["ratios"]["sds/lora memory"] > 0
    assert "lora" in json.loads((out / "throughput.json").read_text())["methods"]
    assert "skipped" in (out / "gpu_check.log").read_text()  # the CUDA tests ran and skipped
