"""docs/method.md section 6: the example method in the doc, run as written."""

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch.testing import assert_close

from sds_vision import (
    adapter_modules,
    create_sds_model,
    export_peft_adapter,
    load_sds_model,
    merge_adapters,
    save_adapter,
)
from sds_vision.methods import METHODS

DOC = Path(__file__).resolve().parents[1] / "docs" / "method.md"


def example_code() -> str:
    """The python block that follows 'saved as `my_methods.py`' in section 6."""
    text = DOC.read_text()
    section = text[text.index("## 6. Adding a method"):]
    blocks = re.findall(r"```python\n(.*?)```", section[section.index("my_methods.py"):], re.S)
    return blocks[0]


@pytest.fixture
def my_methods(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(example_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_methods", raising=False)
    # a copy of the registry for the example to extend, undone after the test
    monkeypatch.setattr("sds_vision.methods.METHODS", dict(METHODS))
    import my_methods  # noqa: F401  (registers "lora_fa")

    import sds_vision.methods as registry
    yield registry.METHODS


def test_doc_example_method_runs(my_methods, tmp_path):
    assert "lora_fa" in my_methods and len(example_code().strip().splitlines()) <= 20
    torch.manual_seed(0)
    model = create_sds_model("test_vit", num_classes=3, method="lora_fa", rank=2, img_size=32)
    mods = dict(adapter_modules(model))
    a_before = {n: m.lora_A.clone() for n, m in mods.items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith("lora_B") or n.startswith("head") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    assert all(torch.equal(m.lora_A, a_before[n]) for n, m in mods.items())  # A frozen
    assert all(m.lora_B.abs().max() > 0 for m in mods.values())  # B trained
    model.eval()
    torch.manual_seed(0)
    plain = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    with torch.no_grad():
        assert_close(merge_adapters(model)(x), model(x), rtol=1e-4, atol=1e-5)
        assert (model(x) - plain(x)).abs().max() > 1e-3
    save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    again = load_sds_model(tmp_path / "a").eval()
    with torch.no_grad():
        assert_close(again(x), model(x))
    peft = pytest.importorskip("peft")
    export_peft_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
        assert_close(theirs(x), model(x), rtol=1e-4, atol=1e-5)
