"""Speed and memory of every method of the registry (and peft's LoRA) on one backbone.

Everything is measured in ONE process with interleaved repeats (method order rotates every
repeat). Times are medians; ratios are medians of per-repeat ratios (methods timed back to
back), so machine noise hits every method alike. Ratios are the result; absolute times
depend on the machine. A step includes the work a method does after the optimizer step (its
engine callbacks): ``sds_lora_bases`` is timed with a QR refresh after EVERY step, its most
expensive schedule.

    python benchmarks/speed/run.py                       # CPU default: vit_small, 224, batch 16
    python benchmarks/speed/run.py --quick               # smoke run (test_vit, 32 px)
    python benchmarks/speed/run.py --device cuda         # GPU default: vit_base, batch 64, bf16

Memory (the part of training memory a method changes), plus the optimizer state: on CUDA
the peak allocated during one step above what was allocated before it; on CPU the bytes of
tensors saved for backward (counted with saved-tensor hooks).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sds_vision import count_parameters, create_sds_model, merge_adapters, plotting
from sds_vision.fileio import atomic_write_text
from sds_vision.methods import METHODS
from sds_vision.methods.base import method_callbacks
from sds_vision.train.callbacks import CallbackList, TrainContext

# options that make a method's per-step cost its worst case (see the module docstring)
METHOD_OPTIONS = {"sds_lora_bases": {"bases_refresh": "every", "bases_startup": "random"}}

TARGET_MODULES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="timm name or alias (default: vit_small on "
                   "CPU, vit_base on CUDA; random init, no weights needed)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default 224)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 CPU / 64 CUDA")
    p.add_argument("--rank", type=int, default=8, help="adapter rank")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (7)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method (2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-peft", action="store_true", help="skip peft even if installed")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="methods to time (default: every method of the registry; LoRA, the "
                        "reference of the ratios, is always added)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0 = torch's default, all cores)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (test_vit, 32 px)")
    p.add_argument("--out", default="runs/speed", help="directory for speed.md/json/png")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.model, args.img_size = args.model or "test_vit", args.img_size or 32
        args.batch_size = args.batch_size or 4
        args.repeats, args.warmup = args.repeats or 3, args.warmup or 1
    args.model = args.model or ("vit_base" if cuda else "vit_small")
    args.img_size = args.img_size or 224
    args.batch_size = args.batch_size or (64 if cuda else 16)
    args.repeats, args.warmup = args.repeats or 7, args.warmup if args.warmup is not None else 2
    return args


class Trained:
    """A model, its optimizer and its method's engine callbacks, stepped like ``fit`` does."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        callbacks = method_callbacks(model) if hasattr(model, "sds_config") else []
        self.callbacks = CallbackList(callbacks)
        self.ctx = TrainContext(model=model, optimizer=opt, cfg=None, out_dir=Path("."),
                                total_steps=10**6)

    def step(self, x, y, device):
        train_step(self.model, self.opt, x, y, device)
        self.ctx.step += 1
        self.callbacks.on_after_optimizer_step(self.ctx)


def build(method, args) -> Trained:
    kw = dict(img_size=args.img_size)
    if method == "peft_lora":
        import peft
        model = create_sds_model(args.model, num_classes=10, method="linear", **kw)
        targets = [n for n, _ in model.named_modules() if n.endswith(TARGET_MODULES)]
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets,
                              modules_to_save=["head"])
        model = peft.get_peft_model(model, cfg)
    else:
        if METHODS[method].low_rank:
            kw.update(rank=args.rank, **METHOD_OPTIONS.get(method, {}))
        model = create_sds_model(args.model, num_classes=10, method=method, **kw)
    model.to(args.device)
    if args.device.startswith("cuda"):
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    return Trained(model, torch.optim.AdamW(params, lr=1e-4))


def train_step(model, opt, x, y, device):
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                        enabled=device.startswith("cuda")):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of the per-repeat ratio a/b: both were timed back to back in
    the same repeat, so slow drifts of machine load cancel."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def memory_bytes(trained: Trained, x, y, device):
    """Memory a method's training step needs beyond the resident weights, plus its optimizer
    state. CUDA: peak allocated during one step minus what was allocated before it (all
    methods' models share the device, so the absolute peak would hide the differences).
    CPU: bytes of the tensors saved for backward."""
    state = sum(v.numel() * v.element_size() for s in trained.opt.state.values()
                for v in s.values() if torch.is_tensor(v))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trained.step(x, y, device)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before + state
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trained.step(x, y, device)
    return sum(seen.values()) + state


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = list(args.methods or METHODS)
    if "lora" not in methods:
        methods.insert(0, "lora")  # the reference of every ratio
    try:
        if not args.no_peft:
            import peft  # noqa: F401
            methods.append("peft_lora")
    except ImportError:
        print("peft not installed: skipping the peft LoRA comparison")
    dev = args.device
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    built = {m: build(m, args) for m in methods}
    params = {m: count_parameters(built[m].model)["trainable"] if m != "peft_lora" else
              sum(p.numel() for p in built[m].model.parameters() if p.requires_grad)
              for m in methods}
    print(f"{args.model} {args.img_size}px batch {args.batch_size} on {dev}: "
          f"warm-up {args.warmup}, {args.repeats} interleaved repeats", flush=True)
    for m in methods:
        for _ in range(args.warmup):
            built[m].step(x, y, dev)
    times = {m: [] for m in methods}
    for rep in range(args.repeats):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        for m in order:
            times[m].append(timed(lambda m=m: built[m].step(x, y, dev), dev))
        print(f"  repeat {rep + 1}/{args.repeats}: " +
              ", ".join(f"{m} {times[m][-1]:.3f}s" for m in methods), flush=True)
    mem = {m: memory_bytes(built[m], x, y, dev) for m in methods}
    step = {m: statistics.median(v) for m, v in times.items()}

    # Inference: merged SDS-LoRA model vs the plain base model, same weights otherwise.
    sds_model = built["sds_lora"].model if "sds_lora" in built else built["lora"].model
    merged = merge_adapters(sds_model).eval()
    plain = create_sds_model(args.model, num_classes=10, method="full",
                             img_size=args.img_size).to(dev).eval()
    lat = {"merged": [], "base": []}
    with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16,
                                         enabled=dev.startswith("cuda")):
        for mdl in (merged, plain):
            mdl(x)
        for rep in range(args.repeats * 2):
            pair = [("merged", merged), ("base", plain)][:: 1 if rep % 2 else -1]
            for name, mdl in pair:
                lat[name].append(timed(lambda mdl=mdl: mdl(x), dev))
    fwd = {k: statistics.median(v) for k, v in lat.items()}
    to_lora = {m: {"step": paired(times, m, "lora"), "memory": mem[m] / mem["lora"]}
               for m in methods}
    ratios = {"merged/base forward": paired(lat, "merged", "base")}
    if "sds_lora" in to_lora:
        ratios["sds/lora step"] = to_lora["sds_lora"]["step"]
        ratios["sds/lora memory"] = to_lora["sds_lora"]["memory"]
    if "full" in to_lora:
        ratios["lora/full step"] = paired(times, "lora", "full")
    if "peft_lora" in step:
        ratios["ours lora/peft step"] = paired(times, "lora", "peft_lora")
        ratios["ours sds/peft step"] = paired(times, "sds_lora", "peft_lora")
    result = dict(setting=vars(args), machine=_machine(dev), step_s=step, times_s=times,
                  memory_bytes=mem, trainable_params=params, forward_s=fwd, ratios=ratios,
                  ratios_to_lora=to_lora)
    report(result, Path(args.out), dev)
    return result


def _machine(dev):
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def report(result, out: Path, dev: str) -> None:
    mem_label = "step peak over resident + optim MB" if dev.startswith("cuda") else "saved+optim MB"
    lines = [f"Machine: {result['machine']}; torch {torch.__version__}", "",
             f"| method | trainable params | step time (median s) | step / LoRA | {mem_label} | "
             "memory / LoRA |", "|---|---:|---:|---:|---:|---:|"]
    for m, t in result["step_s"].items():
        r = result["ratios_to_lora"][m]
        lines.append(f"| {m} | {result['trainable_params'][m]:,} | {t:.4f} | {r['step']:.3f} | "
                     f"{result['memory_bytes'][m] / 2**20:.1f} | {r['memory']:.3f} |")
    lines += ["", "| forward (no grad) | median s |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["forward_s"].items()]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.md", text + "\n")
    atomic_write_text(out / "speed.json", json.dumps(result, indent=2, default=str))
    fig, axes = plotting.figure(1, 2, figsize=(13, 4))
    names = list(result["step_s"])
    axes[0].bar(names, [result["step_s"][m] for m in names], color="tab:blue")
    axes[0].set_ylabel("train step, median s")
    axes[1].bar(names, [result["memory_bytes"][m] / 2**20 for m in names], color="tab:orange")
    axes[1].set_ylabel(mem_label)
    for ax in axes:
        ax.tick_params(axis="x", rotation=35)
    fig.suptitle(f"{result['setting']['model']}, batch {result['setting']['batch_size']}, "
                 f"{result['machine']}", fontsize=9)
    plotting.save(fig, out / "speed.png", dpi=120)
    print(f"wrote {out / 'speed.md'}, {out / 'speed.json'}, {out / 'speed.png'}")


if __name__ == "__main__":
    main()
