"""Convergence benchmark: every method of the registry, every figure from one run.

    python benchmarks/convergence/run.py --out runs/convergence --threads 1   # ~21 min, 2 cores
    python benchmarks/convergence/run.py --out /tmp/conv --quick              # smoke, ~15 s

Part 1, a controlled low-rank regression (``regression.py``): steps to 1e-2 and 1e-4 of
the initial loss vs the condition number of the target, plain SGD and AdamW, every low-rank
variant (``variants.py``: LoRA, LoRA+, DoRA, PiSSA, preconditioned LoRA and the SDS-LoRA
readings) at its best lr from a grid. Part 2, a small vision transfer (``vision.py``): a tiny
ViT pretrained on one generated task, adapted to another by linear probing, full
fine-tuning and the low-rank variants, several seeds and lrs, with gradient diagnostics.

Writes to ``--out``: ``convergence.md`` (the printed tables), ``convergence.json`` (raw
numbers), ``regression_steps.png``, ``regression_curves.png``, ``vision_train_loss.png``,
``vision_diagnostics_<variant>.png`` (LoRA and the SDS-LoRA variants) and the engine's run
directories under ``vision/runs``. Nothing is hard-coded: every number comes from this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline benchmark: never wait for the hub

import numpy as np
import torch

from benchmarks.convergence import regression, vision
from benchmarks.convergence.variants import LOW_RANK, VARIANTS
from sds_vision import plotting, transfer
from sds_vision.data import make_demo_data
from sds_vision.diagnostics import plot_diagnostics
from sds_vision.fileio import atomic_write_text

_ADAPTER_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
FULL = dict(
    kappas=(10, 100, 1000), reg_steps=1500, reg_methods=LOW_RANK,
    reg_lrs={"sgd": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
             "adamw": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},
    n_train=256, n_val=64, source_epochs=40, vis_steps=300, seeds=(0, 1, 2),
    # the ablations sds_lora_qr and sds_bases_every run in the regression only (time)
    vis_lrs={"linear": (3e-2, 1e-1, 3e-1), "full": (3e-4, 1e-3, 3e-3), "lora": _ADAPTER_LRS,
             "lora_plus": (3e-4, 1e-3, 3e-3, 1e-2), "dora": _ADAPTER_LRS, "pissa": _ADAPTER_LRS,
             "precond_lora": _ADAPTER_LRS, "sds_lora": _ADAPTER_LRS, "sds_bases": _ADAPTER_LRS,
             "sds_bases_random": _ADAPTER_LRS},
    diag_every=25)
QUICK = dict(
    kappas=(100,), reg_steps=150, reg_methods=LOW_RANK,
    reg_lrs={"sgd": (4.0, 8.0), "adamw": (3e-2,)},
    n_train=8, n_val=4, source_epochs=1, vis_steps=4, seeds=(0,),
    vis_lrs={"linear": (1e-2,), "lora": (3e-3,), "sds_lora": (3e-3,), "sds_bases": (3e-3,),
             "dora": (3e-3,), "full": (1e-3,)},
    diag_every=2)
DIAGNOSTIC_PLOTS = ("lora", "sds_lora", "sds_bases", "sds_bases_random")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/convergence"),
                    help="output directory (tables, PNGs, JSON, run directories)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings for CI smoke tests (~20 s); numbers are not evidence")
    ap.add_argument("--parts", nargs="+", choices=("regression", "vision"),
                    default=["regression", "vision"], help="which parts to run")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="where the generated demo data goes (default: <out>/data)")
    ap.add_argument("--target", default="texture",
                    help="transfer task of the demo data ('shapes' is barely learnable at 16 px)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for these tiny problems on a busy box)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- tables
def _steps(v) -> str:
    return "not reached" if v is None else str(v)


def _short(v) -> str:
    return "–" if v is None else str(v)


def _loss(s: dict, stop_rel: float) -> str:
    if s["diverged"]:
        return "diverged"
    if s["stopped_early"]:
        return f"<{stop_rel:.0e} (step {s['stopped_at']})"
    return f"{s['final_rel_loss']:.1e}"


def variants_legend() -> str:
    """What each row name means: the registry method and its options."""
    return "Methods: " + "; ".join(
        f"`{n}` = {v.label} (`{v.method}`{''.join(f', {k}={o}' for k, o in v.options.items())})"
        for n, v in VARIANTS.items()) + "."


def regression_tables(reg: dict) -> str:
    p = reg["problem"]
    best = {(b["optimizer"], b["kappa"], b["method"]): b for b in reg["best"]}
    cols = [(o, k) for o in reg["lr_grids"] for k in reg["kappas"]]
    lines = [f"### Low-rank regression ({p['d_out']}x{p['d_in']} layer, rank-{p['rank']} adapter "
             f"and target, {reg['steps']} full-batch steps, fixed whitened batch of {p['n']})",
             "",
             "Steps to 1e-2 / 1e-4 of the initial loss at each method's best lr (– = not "
             "reached; pre-phase steps included). Grid: " + "; ".join(
                 f"{o}: {', '.join(f'{v:g}' for v in g)}" for o, g in reg["lr_grids"].items())
             + ".", "",
             "| method | " + " | ".join(f"{o} κ={k:g}" for o, k in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for method in reg["methods"]:
        cells = []
        for o, k in cols:
            st = best[(o, k, method)]["steps_to"]
            cells.append(f"{_short(st['0.01'])} / {_short(st['0.0001'])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Details at the best lr:", "",
              "| optimizer | kappa | method | best lr | steps to 1e-2 | steps to 1e-4 | "
              "final loss / initial |", "|---|---|---|---|---|---|---|"]
    for b in reg["best"]:
        edge = " (grid edge)" if b["lr_at_grid_edge"] else ""
        lines.append(f"| {b['optimizer']} | {b['kappa']:g} | {b['method']} | {b['lr']:g}{edge} | "
                     f"{_steps(b['steps_to']['0.01'])} | {_steps(b['steps_to']['0.0001'])} | "
                     f"{_loss(b, reg['stop_rel'])} |")
    # the same, lr by lr: how sensitive each method is to the lr
    lines += ["", "Final loss / initial at every lr (d = diverged):", "",
              "| optimizer | kappa | method | lr: final loss / initial |",
              "|---|---|---|---|"]
    for opt in reg["lr_grids"]:
        for kappa in reg["kappas"]:
            for method in reg["methods"]:
                cells = []
                for r in reg["runs"]:
                    if (r["optimizer"], r["kappa"], r["method"]) == (opt, kappa, method):
                        v = "d" if r["diverged"] else f"{r['final_rel_loss']:.0e}"
                        cells.append(f"{r['lr']:g}: {v}")
                if cells:
                    lines.append(f"| {opt} | {kappa:g} | {method} | {', '.join(cells)} |")
    return "\n".join(lines)


def vision_tables(vis: dict, best: dict) -> str:
    lines = [f"### Vision transfer ({vis['source']} -> {vis['target']}, tiny ViT, "
             f"{vis['steps_per_epoch'] * vis['epochs']} steps = {vis['epochs']} epochs x "
             f"{vis['steps_per_epoch']}, batch {vis['batch_size']}, rank {vis['rank']}, AdamW, "
             f"seeds {vis['seeds']}; {vis['train_size']} train / {vis['val_size']} val images)",
             "", "Best lr per method = lowest mean final train loss (mean over the last epoch). "
                 "Mean ± std over seeds. Gap closed = the part of LoRA's train-loss gap to full "
                 "fine-tuning a method closes (negative: it widens it). Extra steps = optimizer "
                 "steps of a start-up phase before the scheduled ones (same lr, same data).", "",
             "| method | best lr | trainable params | extra steps | final train loss | "
             "val top-1 % | erank dA | erank dB | cos(-G, dDelta) | gap closed |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pm(e, k, fmt):
        return f"{e[k + '_mean']:{fmt}} ± {e[k + '_std']:{fmt}}" if k + "_mean" in e else "-"

    for method in vis["lr_grids"]:
        e = best[method]
        edge = " (grid edge)" if e["lr_at_grid_edge"] else ""
        gap = f"{e['gap_closed']:.0%}" if "gap_closed" in e else "-"
        lines.append(f"| {method} | {e['lr']:g}{edge} | {e['trainable_params']:,} | "
                     f"{e['extra_steps']} | {pm(e, 'train_loss', '.4f')} | "
                     f"{pm(e, 'val_top1', '.1f')} | "
                     f"{pm(e, 'erank_gA', '.2f')} | {pm(e, 'erank_gB', '.2f')} | "
                     f"{pm(e, 'cos_update', '.3f')} | {gap} |")
    seeds = vis["seeds"]
    lines += ["", "Per seed at the best lr (final train loss / val top-1 %; gap closed per "
                  "seed):", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | gap closed per seed |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for method in vis["lr_grids"]:
        e = best[method]
        cells = [f"{tl:.4f} / {acc:.1f}" for tl, acc in zip(e["train_loss_per_seed"],
                                                            e["val_top1_per_seed"])]
        per = e.get("gap_closed_per_seed")
        lines.append(f"| {method} | " + " | ".join(cells) + " | "
                     + (", ".join(f"{v:.0%}" for v in per) if per else "-") + " |")
    lines += ["", "Every lr (final train loss mean ± std / val top-1 mean):", "",
              "| method | lr | train loss | val top-1 % |", "|---|---|---|---|"]
    for method, lrs in vis["lr_grids"].items():
        for lr in lrs:
            rows = [r for r in vis["runs"] if r["method"] == method and r["lr"] == lr]
            tl = np.array([r["train_loss"] for r in rows])
            acc = np.array([r["val_top1"] for r in rows])
            sd = tl.std(ddof=1) if len(tl) > 1 else 0.0
            lines.append(f"| {method} | {lr:g} | {tl.mean():.4f} ± {sd:.4f} | {acc.mean():.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
COLORS = {"lora": "tab:blue", "lora_plus": "tab:cyan", "dora": "tab:purple",
          "pissa": "tab:brown", "precond_lora": "tab:olive", "sds_lora": "tab:red",
          "sds_lora_qr": "tab:orange", "sds_bases": "tab:pink", "sds_bases_every": "magenta",
          "sds_bases_random": "black", "full": "tab:green", "linear": "tab:gray"}
MARKERS = {"lora": "o", "lora_plus": "v", "dora": "^", "pissa": "<", "precond_lora": ">",
           "sds_lora": "s", "sds_lora_qr": "D", "sds_bases": "P", "sds_bases_every": "X",
           "sds_bases_random": "*", "full": "h", "linear": "."}


def plot_regression(reg: dict, out: Path) -> list[Path]:
    opts = list(reg["lr_grids"])
    targets = (("0.01", "1e-2"), ("0.0001", "1e-4"))
    fig, axes = plotting.figure(len(targets), len(opts), figsize=(6.5 * len(opts), 8),
                                squeeze=False)
    ceiling = reg["steps"] * 1.6
    for i, (target, tname) in enumerate(targets):
        for ax, opt in zip(axes[i], opts):
            for method in reg["methods"]:
                rows = [b for b in reg["best"] if b["optimizer"] == opt and b["method"] == method]
                ks = [b["kappa"] for b in rows]
                ys = [b["steps_to"][target] for b in rows]
                ax.plot(ks, [ceiling if y is None else y for y in ys], "-",
                        marker=MARKERS[method], color=COLORS[method], label=method, alpha=0.85)
            ax.axhline(reg["steps"], color="k", lw=0.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("condition number of the target")
            ax.set_ylabel(f"steps (top line: {reg['steps']}; above = not reached)")
            ax.set_title(f"{opt}: steps to {tname} of the initial loss (best lr each)")
            ax.grid(alpha=0.3, which="both")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    p1 = plotting.save(fig, out / "regression_steps.png")

    fig, axes = plotting.figure(len(opts), len(reg["kappas"]),
                                figsize=(4.5 * len(reg["kappas"]) + 2, 3.6 * len(opts)),
                                squeeze=False)
    for i, opt in enumerate(opts):
        for j, kappa in enumerate(reg["kappas"]):
            ax = axes[i, j]
            for b in reg["best"]:
                if b["optimizer"] == opt and b["kappa"] == kappa:
                    c = np.array(b["curve"])
                    ax.plot(c[:, 0] + 1, np.clip(c[:, 1], 1e-13, 1e3), color=COLORS[b["method"]],
                            label=f"{b['method']} (lr {b['lr']:g})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{opt}, kappa={kappa:g}")
            ax.set_xlabel("step + 1")
            ax.set_ylabel("loss / initial")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    return [p1, plotting.save(fig, out / "regression_curves.png")]


def plot_vision(vis: dict, best: dict, out: Path) -> list[Path]:
    fig, axes = plotting.figure(1, 2, figsize=(14, 5))
    for method in vis["lr_grids"]:
        lr = best[method]["lr"]
        rows = [r for r in vis["runs"] if r["method"] == method and r["lr"] == lr]
        for ax, key in zip(axes, ("curve", "epoch_train_loss")):
            steps = np.array([s for s, _ in rows[0][key]])
            ys = np.array([[v for _, v in r[key]] for r in rows])
            m, sd = ys.mean(0), ys.std(0)
            ax.plot(steps, m, color=COLORS[method], label=f"{method} (lr {lr:g})")
            ax.fill_between(steps, m - sd, m + sd, color=COLORS[method], alpha=0.15)
    axes[0].set_title("train loss (logged batches, mean ± std over seeds)")
    axes[1].set_title("train loss (epoch means, mean ± std over seeds)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    paths = [plotting.save(fig, out / "vision_train_loss.png")]
    for method in DIAGNOSTIC_PLOTS:
        if method not in best:
            continue
        rows = [r for r in vis["runs"] if r["method"] == method and r["lr"] == best[method]["lr"]]
        if rows and rows[0].get("diagnostic_rows"):
            p = out / f"vision_diagnostics_{method}.png"
            plot_diagnostics(rows[0]["diagnostic_rows"], p,
                             title=f"{method}, lr {best[method]['lr']:g}, seed {rows[0]['seed']}")
            paths.append(p)
    return paths


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"settings": {k: (v if not isinstance(v, dict) else
                                     {a: list(b) for a, b in v.items()}) for k, v in s.items()},
                    "quick": args.quick, "argv": sys.argv[1:] if argv is None else list(argv)}
    quick_note = " (--quick: smoke settings, not evidence)" if args.quick else ""
    sections, figures = [f"# Convergence benchmark{quick_note}", variants_legend()], []

    if "regression" in args.parts:
        t = time.perf_counter()
        reg = regression.run_regression(s["kappas"], s["reg_lrs"], s["reg_steps"],
                                        methods=s["reg_methods"])
        reg["seconds"] = time.perf_counter() - t
        result["regression"] = reg
        sections.append(regression_tables(reg))
        figures += plot_regression(reg, out)

    if "vision" in args.parts:
        t = time.perf_counter()
        data_root = args.data_root or out / "data"
        make_demo_data(data_root, n_train_per_class=s["n_train"], n_val_per_class=s["n_val"],
                       img_size=transfer.IMG_SIZE, seed=0)
        vdir = out / "vision"
        vdir.mkdir(exist_ok=True)
        ckpt, source_meta = transfer.pretrain_source(
            data_root, vdir, epochs=s["source_epochs"], seed=0, n_train=s["n_train"],
            n_val=s["n_val"])
        vis = vision.run_transfer(vdir, data_root, args.target, ckpt, s["vis_lrs"], s["seeds"],
                                  s["vis_steps"], diag_every=s["diag_every"])
        vis["source"] = source_meta["task"]
        vis["source_checkpoint"] = source_meta
        best = vision.select_best(vis)
        vis["best"] = best
        vis["seconds"] = time.perf_counter() - t
        result["vision"] = vis
        sections.append(vision_tables(vis, best))
        figures += plot_vision(vis, best, out)

    result["seconds"] = time.perf_counter() - t0
    sections.append(f"Figures: {', '.join(p.name for p in figures)}. "
                    f"Raw numbers: convergence.json. "
                    f"Wall time {result['seconds']:.0f} s.")
    md = "\n\n".join(sections) + "\n"
    print(md)
    atomic_write_text(out / "convergence.md", md)
    atomic_write_text(out / "convergence.json", json.dumps(_jsonable(result), indent=1))
    result["markdown"] = md
    return result


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, (np.floating, np.integer)):
        return _jsonable(o.item())
    if isinstance(o, Path):
        return str(o)
    return o


if __name__ == "__main__":
    main()
