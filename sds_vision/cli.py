"""`sds-vision`: finetune / evaluate / predict / export / demo from the command line."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

EXIT_ERROR = 1


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    from sds_vision.models import METHODS
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True,
        help="image folder: DIR/<class>/* or DIR/train|val[|test]/<class>/*")
    d.add_argument("--val-ratio", type=float, default=0.2,
        help="fraction of each class held out for validation when DIR has no val/ (default 0.2)")
    d.add_argument("--skip-corrupt", action="store_true",
        help="drop undecodable images instead of failing (strict by default)")
    d.add_argument("--no-aug", action="store_true",
        help="train without augmentation (resize + center crop only)")
    d.add_argument("--no-hflip", action="store_true",
        help="no random horizontal flip (orientation-sensitive tasks)")
    d.add_argument("--workers", type=int, default=2,
        help="DataLoader worker processes (0 = load in the main process)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="vit_base",
        help="alias (vit_base, swin_base, convnext_base, ...) or timm model name (default "
             "vit_base)")
    m.add_argument("--method", default="sds_lora",
        help=f"what to train: {', '.join(METHODS)} (default sds_lora)")
    m.add_argument("--rank", type=int, default=8, help="adapter rank r (default 8)")
    m.add_argument("--alpha", type=float, default=None,
        help="adapter scaling alpha (default: the method's default)")
    m.add_argument("--targets", default=None,
        help="comma-separated layers to adapt, e.g. 'q,v' (slices of the fused qkv), "
             "'qkv,proj,fc1,fc2' (default: the family's table)")
    m.add_argument("--basis", default="polar", help="SDS-LoRA basis (default polar)")
    m.add_argument("--img-size", type=int, default=None,
        help="input resolution (default: the model's); small values make tiny models run on CPU")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (default 0)")
    m.add_argument("--pretrained", action="store_true",
        help="start from pretrained weights (Hugging Face cache or --checkpoint-path; never "
             "downloads when offline)")
    m.add_argument("--checkpoint-path", default=None,
        help="local weights file (.safetensors/.pth/.npz) for the backbone; implies --pretrained")
    m.add_argument("--timm-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
        help="extra timm.create_model argument, repeatable (e.g. --timm-arg patch_size=4 --timm-"
             "arg depth=4)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    o.add_argument("--batch-size", type=int, default=32, help="batch size per process (default 32)")
    o.add_argument("--eval-every", type=int, default=1,
        help="evaluate every N epochs; the last epoch always (0 = last only; default 1)")
    o.add_argument("--eval-batch-size", type=int, default=None,
        help="evaluation batch size (default 2x --batch-size)")
    o.add_argument("--lr", type=float, default=1e-3,
        help="peak learning rate, AdamW (default 1e-3)")
    o.add_argument("--head-lr", type=float, default=None,
        help="learning rate of the classifier head (default: --lr)")
    o.add_argument("--weight-decay", type=float, default=1e-4,
        help="AdamW weight decay; not applied to biases/norms (default 1e-4)")
    o.add_argument("--warmup-epochs", type=int, default=1,
        help="linear warm-up epochs before the cosine decay (default 1)")
    o.add_argument("--min-lr", type=float, default=0.0,
        help="learning rate at the end of the cosine (default 0)")
    o.add_argument("--label-smoothing", type=float, default=0.0,
        help="cross-entropy label smoothing (default 0)")
    o.add_argument("--clip-grad", type=float, default=1.0,
        help="max gradient norm, 0 = no clipping (default 1.0)")
    o.add_argument("--seed", type=int, default=0,
        help="seed for init, split, order and augmentation (default 0)")
    o.add_argument("--no-amp", action="store_true",
        help="no bf16 autocast on CUDA (CPU is always float32)")
    o.add_argument("--no-channels-last", action="store_true",
        help="no channels-last memory format on CUDA")
    r = p.add_argument_group("run directory")
    r.add_argument("--out", default="runs/finetune", help="run directory (default runs/finetune)")
    r.add_argument("--resume", action="store_true",
        help="continue the run in --out from checkpoints/last.pt (same config required)")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.add_argument("--save-every-steps", type=int, default=0,
        help="also checkpoint every N steps (default: once per epoch)")
    r.add_argument("--log-every", type=int, default=10,
        help="log the training loss every N steps (default 10)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines")
    r.add_argument("--diagnostics-every", type=int, default=0,
        help="every N steps log per-layer gradient diagnostics (effective rank, conditioning, "
             "alignment with the full gradient) to diagnostics.jsonl + diagnostics.png "
             "(default 0 = off)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by `sds-vision finetune`")
    p.add_argument("--weights", default="final", choices=("final", "best"),
        help="final = adapter/ (last epoch), best = checkpoints/best.pt")
    p.add_argument("--checkpoint-path", default=None,
        help="where the frozen base weights are, if not where the run recorded")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sds-vision", description=__doc__)
    ap.add_argument("--debug", action="store_true",
        help="show full tracebacks instead of one-line errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_finetune_args(sub.add_parser("finetune", help="fine-tune a timm model on an image folder",
                                      description="Fine-tune a timm model on an image folder."))
    ev = sub.add_parser("evaluate", help="evaluate a finished run on a split of its data")
    _run_args(ev)
    ev.add_argument("--data", default=None, help="image folder (default: the run's)")
    ev.add_argument("--split", default="val", choices=("train", "val", "test"),
        help="which split (default val)")
    ev.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    ev.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    ev.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    pr = sub.add_parser("predict", help="top-k predictions for images or folders -> CSV")
    _run_args(pr)
    pr.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    pr.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    pr.add_argument("--out", default="-", help="CSV file (default: stdout)")
    ex = sub.add_parser("export", help="merge adapters into a plain timm checkpoint, or write "
                                       "a peft adapter")
    _run_args(ex)
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--format", default="timm", choices=("timm", "peft"),
        help="timm: merged model.safetensors + config.json; peft: adapter for "
             "peft.PeftModel.from_pretrained")
    va = sub.add_parser("validate", add_help=False,
                        help="check a VTAB-1k or FGVC data root before any compute")
    va.add_argument("args", nargs=argparse.REMAINDER,
                    help="ROOT [--benchmark vtab|fgvc] [--tasks ...] [--no-decode]; -h for more")
    from sds_vision.demo import add_demo_args
    add_demo_args(sub.add_parser("demo", help="offline demo: pretrain a tiny ViT, compare "
                                              "methods on synthetic tasks"))
    return ap


def config_from_args(a: argparse.Namespace):
    from sds_vision.models import METHODS
    from sds_vision.train import TrainConfig
    if a.method not in METHODS:
        raise ValueError(f"unknown method {a.method!r}; choose one of {', '.join(METHODS)}")
    targets = [t.strip() for t in a.targets.split(",") if t.strip()] if a.targets else None
    return TrainConfig(
        model=a.model, method=a.method, rank=a.rank, alpha=a.alpha, targets=targets, basis=a.basis,
        epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, head_lr=a.head_lr,
        weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs, min_lr=a.min_lr,
        label_smoothing=a.label_smoothing, clip_grad=a.clip_grad or None, drop_path=a.drop_path,
        img_size=a.img_size, seed=a.seed, pretrained=a.pretrained or bool(a.checkpoint_path),
        checkpoint_path=os.path.abspath(a.checkpoint_path) if a.checkpoint_path else None,
        amp=not a.no_amp, channels_last=not a.no_channels_last, num_workers=a.workers,
        eval_batch_size=a.eval_batch_size, eval_every=a.eval_every, out_dir=a.out, save_every_steps=a.save_every_steps,
        resume=a.resume, overwrite=a.overwrite, log_every_steps=a.log_every,
        progress=not a.no_progress, extra_timm_kwargs=dict(a.timm_arg))


def cmd_finetune(a: argparse.Namespace) -> int:
    from sds_vision.train.finetune import finetune
    callbacks = []
    if a.diagnostics_every > 0:
        from sds_vision.diagnostics import GradientDiagnostics
        callbacks.append(GradientDiagnostics(every=a.diagnostics_every))
    final = finetune(config_from_args(a), a.data, val_ratio=a.val_ratio,
                     skip_corrupt=a.skip_corrupt, augment=not a.no_aug, hflip=not a.no_hflip,
                     callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"val_top1 {final['val_top1']:.2f}  val_top5 {final['val_top5']:.2f}  "
              f"train_loss {final['train_loss']:.4f}  ({final['seconds']:.1f}s) -> {a.out}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from sds_vision.train.finetune import evaluate_run
    metrics = evaluate_run(a.run, data=a.data, split=a.split, weights=a.weights,
                           batch_size=a.batch_size, num_workers=a.workers,
                           checkpoint_path=a.checkpoint_path)
    text = json.dumps(metrics, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from sds_vision.train.finetune import predict_paths
    rows, k = predict_paths(a.run, a.inputs, top_k=a.top_k, batch_size=a.batch_size,
                            weights=a.weights, checkpoint_path=a.checkpoint_path)
    header = ["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob")]
    f = sys.stdout if a.out == "-" else open(a.out, "w", newline="")
    try:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for path, preds in rows:
            w.writerow([path] + [x for label, prob in preds for x in (label, f"{prob:.6f}")])
    finally:
        if f is not sys.stdout:
            f.close()
    if a.out != "-":
        print(f"wrote {len(rows)} predictions to {a.out}", file=sys.stderr)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from sds_vision.train.runs import export_timm, load_run_model
    model, cfg, classes = load_run_model(a.run, a.weights, a.checkpoint_path)
    if a.format == "peft":
        from sds_vision import export_peft_adapter
        out = export_peft_adapter(model, a.out)
    else:
        out = export_timm(model, a.out, classes)
    print(f"exported {cfg.model} ({cfg.method}, {len(classes)} classes) as {a.format} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[1:] if argv[:1] == ["--debug"] else argv
    if rest[:1] == ["validate"]:  # its own parser, so `validate -h` shows its flags
        from sds_vision.data.validate import main as validate_main
        return validate_main(rest[1:])
    args = build_parser().parse_args(argv)
    commands = {"finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict,
                "export": cmd_export}
    if args.command == "demo":
        from sds_vision.demo import run_demo_from_args
        commands["demo"] = run_demo_from_args
    try:
        return commands[args.command](args)
    except BrokenPipeError:  # e.g. `sds-vision predict ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except KeyboardInterrupt:
        print("sds-vision: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as e:
        # TrainError, NonFiniteLossError, DataError and the core's errors land here
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"sds-vision {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
