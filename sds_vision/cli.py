"""`sds-vision`: finetune / evaluate / predict / export / validate / demo from the command line.

Parsers are built from the torch-free configuration dataclasses (defaults and help come
from them), and each command imports its implementation when it runs, so `--help` and
argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path

from .config import AdapterConfig
from .data.augmentation import (
    AUG_PRESETS,
    DEFAULT_AUG,
    DEFAULT_CROP_SCALE,
    check_aug,
    parse_crop_scale,
)
from .data.folder import check_output_outside
from .errors import UserError
from .methods import METHODS
from .train.config import PRECISIONS, SCHEDULES, TrainConfig

EXIT_ERROR = 1
_T = TrainConfig()  # defaults of every training flag
# Errors a user can fix: one line, no traceback. Everything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`sds-vision finetune: error: ...` and a pointer to
    `--help`, not the usage dump) and negative numbers in exponent form (`--lr -1e-3`) read
    as values, so that the value's own check answers instead of "expected one argument"."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse's own pattern (-1, -.5) plus exponents; no flag here looks like a number
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d*\.?\d+[eE][-+]?\d+$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nsee `{self.prog} --help`\n")


def _int_from(minimum: int):
    """argparse type: an integer >= ``minimum`` (for flags that go to no config class)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        return value
    return parse


def _crop_scale(text: str) -> tuple[float, float]:
    try:
        return parse_crop_scale(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_adapter_args(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                     dest_prefix: str = "") -> None:
    """One flag per `AdapterConfig` field, with its default and help (method options say
    which methods use them)."""
    for f in dataclasses.fields(AdapterConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        methods = meta.get("methods")
        help_ = meta["help"] + (f" ({', '.join(methods)} only)" if methods else "")
        kw = dict(dest=dest_prefix + f.name, help=help_ + " (default: %(default)s)")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **kw)
        elif f.name == "targets":
            p.add_argument(flag, default=f.default, metavar="LIST", **kw)
        else:
            typ = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=f.default, choices=meta.get("choices"), **kw)


def adapter_from_args(a: argparse.Namespace, dest_prefix: str = "") -> AdapterConfig:
    return AdapterConfig(**{f.name: getattr(a, dest_prefix + f.name)
                            for f in dataclasses.fields(AdapterConfig)})


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True,
        help="image folder: DIR/<class>/* or DIR/train|val[|test]/<class>/*")
    d.add_argument("--val-ratio", type=float, default=0.2,
        help="fraction of each class held out for validation when DIR has no val/ "
             "(default: %(default)s)")
    d.add_argument("--skip-corrupt", action="store_true",
        help="drop undecodable images instead of failing (strict by default)")
    d.add_argument("--aug", default=DEFAULT_AUG, choices=tuple(AUG_PRESETS),
        help="training augmentation: " + "; ".join(f"{k} = {v}" for k, v in AUG_PRESETS.items())
             + " (default: %(default)s)")
    d.add_argument("--no-aug", dest="aug", action="store_const", const="none",
        help="same as --aug none")
    d.add_argument("--crop-scale", type=_crop_scale, default=None, metavar="MIN[,MAX]",
        help="area range of --aug strong's random resized crop (default: "
             f"{DEFAULT_CROP_SCALE[0]:g},{DEFAULT_CROP_SCALE[1]:g})")
    d.add_argument("--no-hflip", action="store_true",
        help="no random horizontal flip: for anything that is not mirror-symmetric (digits, "
             "text, orientation-sensitive tasks)")
    d.add_argument("--workers", type=int, default=_T.num_workers,
        help="DataLoader worker processes, 0 = load in the main process (default: %(default)s)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=_T.model,
        help="alias (vit_base, swin_base, convnext_base, ...) or timm model name "
             "(default: %(default)s)")
    m.add_argument("--method", default=_T.method, metavar="METHOD",
        help="what to train: " + "; ".join(f"{n} = {s.summary}" for n, s in METHODS.items())
             + " (default: %(default)s)")
    m.add_argument("--img-size", type=int, default=_T.img_size,
        help="input resolution (default: the model's); small values make tiny models run on CPU")
    m.add_argument("--drop-path", type=float, default=_T.drop_path,
        help="stochastic depth rate (default: %(default)s)")
    m.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
        help="start from pretrained weights (Hugging Face cache or --checkpoint-path; never "
             "downloads when offline); --no-pretrained trains from random weights, for smoke "
             "tests (default: %(default)s)")
    m.add_argument("--checkpoint-path", default=None,
        help="local weights file (.safetensors/.pth/.npz) for the backbone; implies --pretrained")
    m.add_argument("--timm-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
        help="extra timm.create_model argument, repeatable (e.g. --timm-arg patch_size=4 "
             "--timm-arg depth=4)")
    add_adapter_args(p.add_argument_group("adapter (low-rank methods)"))
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=_T.epochs,
        help="training epochs (default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=_T.batch_size,
        help="batch size per process and micro-batch (default: %(default)s)")
    o.add_argument("--accum-steps", type=int, default=_T.accum_steps,
        help="micro-batches per optimizer step (gradient accumulation; exact: the loss is "
             "the mean over all of them) (default: %(default)s)")
    o.add_argument("--drop-last", action="store_true",
        help="drop each epoch's last partial batch")
    o.add_argument("--lr", type=float, default=_T.lr,
        help="peak learning rate, AdamW (default: %(default)s)")
    o.add_argument("--head-lr", type=float, default=_T.head_lr,
        help="learning rate of the classifier head (default: --lr)")
    o.add_argument("--weight-decay", type=float, default=_T.weight_decay,
        help="AdamW weight decay; not applied to biases/norms (default: %(default)s)")
    o.add_argument("--sched", default=_T.sched, choices=SCHEDULES,
        help="learning-rate decay after the warm-up (default: %(default)s)")
    o.add_argument("--sched-per", default=_T.sched_per, choices=("step", "epoch"),
        help="update the learning rate every optimizer step or once per epoch "
             "(default: %(default)s)")
    o.add_argument("--warmup-epochs", type=int, default=_T.warmup_epochs,
        help="linear warm-up epochs, capped at --epochs - 1 (default: %(default)s)")
    o.add_argument("--warmup-lr", type=float, default=_T.warmup_lr,
        help="learning rate the warm-up starts from (default: --lr x 0.01)")
    o.add_argument("--min-lr", type=float, default=_T.min_lr,
        help="learning rate at the end of the decay (default: %(default)s)")
    o.add_argument("--label-smoothing", type=float, default=_T.label_smoothing,
        help="cross-entropy label smoothing (default: %(default)s)")
    o.add_argument("--clip-grad", type=float, default=_T.clip_grad,
        help="max gradient norm, 0 = no clipping (default: %(default)s)")
    o.add_argument("--seed", type=int, default=_T.seed,
        help="seed for init, split, order and augmentation (default: %(default)s)")
    h = p.add_argument_group("hardware")
    h.add_argument("--precision", default=_T.precision, choices=PRECISIONS,
        help="CUDA: bf16 autocast or fp32 (TF32 matmuls); the CPU always trains in float32 "
             "(default: %(default)s)")
    h.add_argument("--no-channels-last", action="store_true",
        help="no channels-last memory format on CUDA")
    h.add_argument("--compile", action="store_true", help="torch.compile the model")
    h.add_argument("--threads", type=int, default=_T.threads,
        help="torch CPU threads (default: torch's choice, all cores)")
    r = p.add_argument_group("run directory")
    r.add_argument("--out", default=_T.out_dir, help="run directory (default: %(default)s)")
    r.add_argument("--resume", action="store_true",
        help="continue the run in --out from checkpoints/last.pt (same config required)")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.add_argument("--save-every-steps", type=int, default=_T.save_every_steps,
        help="also checkpoint every N steps, 0 = once per epoch (default: %(default)s)")
    r.add_argument("--eval-every", type=int, default=_T.eval_every,
        help="evaluate every N epochs and always the last, 0 = last only (default: %(default)s)")
    r.add_argument("--eval-batch-size", type=int, default=_T.eval_batch_size,
        help="evaluation batch size (default: 2x --batch-size)")
    r.add_argument("--log-every", type=int, default=_T.log_every_steps,
        help="log the training loss every N steps (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines")
    r.add_argument("--diagnostics-every", type=int, default=0,
        help="every N steps log per-layer gradient diagnostics (effective rank, conditioning, "
             "alignment with the full gradient) to diagnostics.jsonl + diagnostics.png "
             "(default: 0 = off)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory written by `sds-vision finetune`")
    p.add_argument("--weights", default="final", choices=("final", "best"),
        help="final = adapter/ (last epoch), best = checkpoints/best.pt (default: %(default)s)")
    p.add_argument("--checkpoint-path", default=None,
        help="where the frozen base weights are, if not where the run recorded")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="sds-vision", description=__doc__.split("\n")[0])
    ap.add_argument("--debug", action="store_true",
        help="show full tracebacks instead of one-line errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_finetune_args(sub.add_parser(
        "finetune", help="fine-tune a timm model on an image folder",
        description="Fine-tune a timm model on an image folder. It starts from pretrained "
                    "weights (--no-pretrained: random init) and trains with the 'light' "
                    "augmentation (--aug)."))
    ev = sub.add_parser("evaluate", help="evaluate a finished run on a split of its data",
                        description="Evaluate a finished run on a split of its data (GPU when "
                                    "there is one); prints JSON metrics.")
    _run_args(ev)
    ev.add_argument("--data", default=None, help="image folder (default: the run's)")
    ev.add_argument("--split", default="val", choices=("train", "val", "test"),
        help="which split (default: %(default)s)")
    ev.add_argument("--batch-size", type=_int_from(1), default=64,
        help="evaluation batch size (default: %(default)s)")
    ev.add_argument("--workers", type=_int_from(0), default=0,
        help="DataLoader workers (default: %(default)s)")
    ev.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    pr = sub.add_parser("predict", help="top-k predictions for images or folders -> CSV",
                        description="Top-k class predictions for image files and folders "
                                    "(searched recursively), as CSV.")
    _run_args(pr)
    pr.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    pr.add_argument("--top-k", type=_int_from(1), default=5,
        help="classes per image (default: %(default)s)")
    pr.add_argument("--batch-size", type=_int_from(1), default=64,
        help="batch size (default: %(default)s)")
    pr.add_argument("--out", default="-", help="CSV file (default: stdout)")
    ex = sub.add_parser("export", help="merge adapters into a plain timm checkpoint, or write "
                                       "a peft adapter",
                        description="Export a finished run: a merged plain-timm checkpoint "
                                    "(model.safetensors + config.json) or a peft LoRA adapter.")
    _run_args(ex)
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--format", default="timm", choices=("timm", "peft"),
        help="timm: merged model.safetensors + config.json; peft: adapter for "
             "peft.PeftModel.from_pretrained (default: %(default)s)")
    sub.add_parser("validate", add_help=False,
                   help="check a VTAB-1k or FGVC data root before any compute "
                        "(`sds-vision validate -h` for its flags)")
    from .demo import add_demo_args  # torch-free at import; see demo.py
    add_demo_args(sub.add_parser("demo", help="offline demo: pretrain a tiny ViT, compare "
                                              "methods on synthetic tasks",
                                 description="Offline demo: pretrain a tiny ViT on a synthetic "
                                             "task, then compare methods on two others."))
    return ap


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    if a.checkpoint_path and not a.pretrained:
        raise UserError("--checkpoint-path and --no-pretrained exclude each other")
    return TrainConfig(
        model=a.model, method=a.method, adapter=adapter_from_args(a), epochs=a.epochs,
        batch_size=a.batch_size, accum_steps=a.accum_steps, drop_last=a.drop_last, lr=a.lr,
        head_lr=a.head_lr, weight_decay=a.weight_decay, sched=a.sched, sched_per=a.sched_per,
        warmup_epochs=a.warmup_epochs, warmup_lr=a.warmup_lr, min_lr=a.min_lr,
        label_smoothing=a.label_smoothing, clip_grad=a.clip_grad or None, drop_path=a.drop_path,
        img_size=a.img_size, seed=a.seed, pretrained=a.pretrained or bool(a.checkpoint_path),
        checkpoint_path=os.path.abspath(a.checkpoint_path) if a.checkpoint_path else None,
        precision=a.precision, channels_last=not a.no_channels_last, compile=a.compile,
        num_workers=a.workers, threads=a.threads, eval_batch_size=a.eval_batch_size,
        eval_every=a.eval_every, out_dir=a.out, save_every_steps=a.save_every_steps,
        resume=a.resume, overwrite=a.overwrite, log_every_steps=a.log_every,
        progress=not a.no_progress, extra_timm_kwargs=dict(a.timm_arg))


def cmd_finetune(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    check_aug(a.aug, a.crop_scale)  # torch-free checks answer before the heavy imports
    check_output_outside(a.data, a.out)
    from .diagnostics import GradientDiagnostics
    from .train.finetune import finetune
    callbacks = [GradientDiagnostics(every=a.diagnostics_every)] if a.diagnostics_every > 0 else []
    final = finetune(cfg, a.data, val_ratio=a.val_ratio, skip_corrupt=a.skip_corrupt,
                     aug=a.aug, hflip=not a.no_hflip, crop_scale=a.crop_scale,
                     callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"val_top1 {final['val_top1']:.2f}  val_top5 {final['val_top5']:.2f}  "
              f"train_loss {final['train_loss']:.4f}  ({final['seconds']:.1f}s) -> {a.out}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .fileio import atomic_write_text
    from .train.finetune import evaluate_run
    metrics = evaluate_run(a.run, data=a.data, split=a.split, weights=a.weights,
                           batch_size=a.batch_size, num_workers=a.workers,
                           checkpoint_path=a.checkpoint_path)
    text = json.dumps(metrics, indent=2)
    print(text)
    if a.out:
        atomic_write_text(a.out, text + "\n")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .fileio import atomic_write_text
    from .train.finetune import predict_paths
    rows, k = predict_paths(a.run, a.inputs, top_k=a.top_k, batch_size=a.batch_size,
                            weights=a.weights, checkpoint_path=a.checkpoint_path)
    header = ["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob")]
    buf = sys.stdout if a.out == "-" else io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for path, preds in rows:
        w.writerow([path] + [x for label, prob in preds for x in (label, f"{prob:.6f}")])
    if a.out != "-":
        atomic_write_text(a.out, buf.getvalue())
        print(f"wrote {len(rows)} predictions to {a.out}", file=sys.stderr)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_peft_adapter, export_timm
    from .train.finetune import load_run_model, run_data_config
    model, cfg, classes = load_run_model(a.run, a.weights, a.checkpoint_path)
    if a.format == "peft":
        out = export_peft_adapter(model, a.out)
    else:
        out = export_timm(model, a.out, classes, data_config=run_data_config(a.run, model, cfg))
    print(f"exported {cfg.model} ({cfg.method}, {len(classes)} classes) as {a.format} -> {out}")
    if a.format == "timm":
        print(f"load: timm.create_model('local-dir:{Path(out).resolve()}', pretrained=True); "
              "preprocessing: timm.data.resolve_data_config(model=model)")
    elif not cfg.pretrained:
        print(f"note: the run trained on a randomly initialised {cfg.model} (no --pretrained), "
              f"so the adapter only fits that exact base: rebuild it with torch.manual_seed("
              f"{cfg.seed}) right before timm.create_model (see docs/finetuning.md), or export "
              "--format timm, which holds every weight")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo_from_args
    return run_demo_from_args(a)


COMMANDS = {"finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "export": cmd_export, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = argv[:1] == ["--debug"]
    rest = argv[1:] if debug else argv
    args = None
    try:
        if rest[:1] == ["validate"]:  # its own parser, so `validate -h` shows its flags
            from .data.validate import main as validate_main
            return validate_main(rest[1:], prog="sds-vision validate")
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `sds-vision predict ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except KeyboardInterrupt:
        print(interrupted_message(args), file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"sds-vision {rest[0] if rest else ''}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR


def interrupted_message(args: argparse.Namespace | None) -> str:
    """What Ctrl-C prints: for `finetune`, how to continue the run."""
    if args is None or getattr(args, "command", None) != "finetune":
        return "sds-vision: interrupted"
    again = "" if args.resume else " plus --resume"
    return (f"sds-vision finetune: interrupted; to continue from the last checkpoint in "
            f"{args.out}, run the same command{again} (same --out)")


if __name__ == "__main__":
    sys.exit(main())
