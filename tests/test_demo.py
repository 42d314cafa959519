"""The offline demo (`--quick`): runs end to end, numbers come from the runs, cache reused."""

import json

import pytest

from sds_vision.demo import METHOD_LR, run_demo


@pytest.mark.slow
def test_quick_demo_end_to_end_and_cache(tmp_path):
    lines = []
    out, cache = tmp_path / "demo", tmp_path / "cache"
    rows = run_demo(out, quick=True, cache_dir=str(cache), log=lines.append)
    assert [(r["task"], r["method"]) for r in rows] == [
        (t, m) for t in ("texture", "count") for m in ("linear", "lora", "sds_lora", "full")]
    table = (out / "results.md").read_text()
    assert table.startswith("| task | method | trainable params | final train loss | val top-1")
    assert table.strip() in "\n".join(lines) and (out / "loss_curves.png").stat().st_size > 10_000
    source = next(cache.glob("source_orientation_*.safetensors"))
    assert any(x.startswith("source model: pretrained on 'orientation'") for x in lines)
    assert any(x.startswith("source: ") and "val top-1" in x for x in lines)
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    for r in rows:  # the table reports what each run wrote, through the finetune code path
        run = out / r["task"] / r["method"]
        final = json.loads((run / "final_metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert final["val_top1"] == r["val_top1"] and final["train_loss"] == r["train_loss"]
        assert config["pretrained"] and config["checkpoint_path"] == str(source)
        assert config["lr"] == r["lr"] == METHOD_LR[r["method"]]
        assert f"| {r['lr']:g} |" in table
        assert (run / "classes.json").is_file()
    params = {r["method"]: r["trainable_params"] for r in rows if r["task"] == "count"}
    assert params["linear"] == 4 * 64 + 4  # the new head only (test_vit: width 64)
    assert params["linear"] < params["lora"] == params["sds_lora"] < params["full"]

    mtime = source.stat().st_mtime_ns
    again = run_demo(tmp_path / "demo2", quick=True, cache_dir=str(cache), tasks=["texture"],
                     methods=["linear"], log=lines.append)
    assert source.stat().st_mtime_ns == mtime and any("cached" in x for x in lines)
    assert again[0]["val_top1"] == rows[0]["val_top1"]  # deterministic given the cache
