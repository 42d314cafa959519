#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes on one GPU (budgeted for an H200):
#   1. the CUDA-marked tests            (pytest -m cuda, but --compile's)       <=  90 s
#   2. the CUDA --compile test          (inductor on SDS-LoRA; compiling is slow) <=  90 s
#   3. the speed benchmark              (vit_base, bf16, batch 64: SDS/LoRA step-time and
#                                        memory ratios, merged/base forward, ours vs peft) <= 110 s
#   4. the sweep-throughput projection  (benchmarks/vtab/throughput.py, ViT-B/16)   <= 150 s
# Each step is time-boxed; a failed or timed-out step does not stop the others, and every
# step's output that exists is kept. Writes, flat into OUT_DIR (7 files):
#   gpu_check.md / gpu_check.json   step status, seconds, GPU, versions
#   gpu_check.log                   every step's output
#   speed.md / speed.json           benchmarks/speed/run.py
#   throughput.md / throughput.json benchmarks/vtab/throughput.py
#
# Usage:  scripts/gpu_check.sh OUT_DIR [--install] [--dry]
#   --install  first run the README's install command (needs the package index), nothing else
#   --dry      CPU rehearsal of the same steps with tiny settings (checks the wiring)
# Without a CUDA device (and without --dry) it stops at once with exit status 2.
set -uo pipefail

usage="usage: scripts/gpu_check.sh OUT_DIR [--install] [--dry]"
OUT=${1:?$usage}
shift
DRY=0
INSTALL=0
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    --install) INSTALL=1 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, installed or not
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
STEPS="$OUT/.steps.tsv"
: > "$LOG"
: > "$STEPS"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH" "$STEPS"' EXIT
T0=$(date +%s)

if [ "$INSTALL" -eq 1 ]; then
  # --- README: install --- (the only thing this script ever installs)
  pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]" >>"$LOG" 2>&1 \
    || { echo "gpu_check: the README's install command failed (see $LOG)" >&2; exit 2; }
fi

# step NAME SECONDS CMD...: run CMD under `timeout`, log its output, record status + time.
step() {
  local name=$1 budget=$2
  shift 2
  local start rc status
  start=$(date +%s)
  echo "=== $name (budget ${budget}s): $*" >>"$LOG"
  timeout -k 5 "$budget" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - start ))" >>"$STEPS"
  echo "=== $name: $status (exit $rc, $(( $(date +%s) - start ))s)" >>"$LOG"
}

summary() {  # gpu_check.json + gpu_check.md from the step table (python's json only)
  python - "$OUT" "$STEPS" "$DRY" "$(( $(date +%s) - T0 ))" "$SCRATCH/env.json" "$@" <<'EOF'
import json, sys, time
from pathlib import Path
out, steps, dry, total, env_file = (Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1",
                                    sys.argv[4], Path(sys.argv[5]))
note = " ".join(sys.argv[6:])
rows = [dict(zip(("step", "status", "exit", "seconds"), line.split("\t")))
        for line in steps.read_text().splitlines() if line]
env = json.loads(env_file.read_text()) if env_file.is_file() else {}
env["date"] = time.strftime("%Y-%m-%d %H:%M")
res = {"dry_run": dry, "seconds": int(total), "environment": env, "steps": rows, "note": note}
(out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
gpu = env.get("gpu") or "none (not measured on a GPU)"
lines = [f"# GPU check{' (CPU dry run: not measured on a GPU)' if dry else ''}", "",
         f"{env['date']}; GPU: {gpu}; torch {env.get('torch')}; {total} s in all.", ""]
if note:
    lines += [note, ""]
if rows:
    lines += ["| step | status | exit | seconds |", "|---|---|---:|---:|"]
    lines += [f"| {r['step']} | {r['status']} | {r['exit']} | {r['seconds']} |" for r in rows]
    lines += ["", "Outputs: speed.md / speed.json, throughput.md / throughput.json; every "
              "step's output in gpu_check.log."]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

# One interpreter start: versions for the summary, and whether a GPU is visible.
python - "$SCRATCH/env.json" >>"$LOG" 2>&1 <<'EOF'
import json, platform, sys
try:
    import torch
    import torchvision
except Exception as e:
    print(f"not importable: {e}")
    sys.exit(4)
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__,
       "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name(0) if cuda else None}
open(sys.argv[1], "w").write(json.dumps(env))
print(env)
sys.exit(0 if cuda else 3)
EOF
case $? in
  0) ;;
  3) if [ "$DRY" -eq 0 ]; then
       echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False);" \
            "nothing was measured. Run it on a GPU machine, or pass --dry for a CPU" \
            "rehearsal." >&2
       summary "No CUDA device visible: nothing ran; not measured on a GPU."
       exit 2
     fi ;;
  *) echo "gpu_check: torch/torchvision are not importable (see $LOG); install with the" \
          "README's command: pip install torch==2.14.1 torchvision==0.29.1 -e \".[test]\"" \
          "(or pass --install)" >&2
     summary "torch or torchvision not importable: nothing ran."
     exit 2 ;;
esac
nvidia-smi >>"$LOG" 2>&1 || true

if [ "$DRY" -eq 0 ]; then
  step cuda_tests 90 python -m pytest -m cuda -k "not compile" -v -p no:cacheprovider tests
  step cuda_compile 90 python -m pytest -m cuda -k compile -v -p no:cacheprovider tests
  step speed 110 python benchmarks/speed/run.py --device cuda --model vit_base \
    --batch-size 64 --out "$SCRATCH/speed"
  step throughput 150 python benchmarks/vtab/throughput.py --device cuda --out "$OUT"
else
  # the same commands, cheaper: the new CUDA tests' file (they skip), tiny models
  step cuda_tests 90 python -m pytest -m cuda -k "not compile" -q -p no:cacheprovider \
    tests/test_gpu_path.py
  step cuda_compile 90 python -m pytest -m cuda -k compile -q -p no:cacheprovider \
    tests/test_gpu_path.py
  step speed 110 python benchmarks/speed/run.py --quick --no-peft --repeats 1 --threads 1 \
    --out "$SCRATCH/speed"
  step throughput 150 python benchmarks/vtab/throughput.py --quick --device cpu --threads 1 \
    --methods lora --out "$OUT"
fi
for f in speed.md speed.json; do  # speed.png stays behind: few, flat outputs
  [ -f "$SCRATCH/speed/$f" ] && cp "$SCRATCH/speed/$f" "$OUT/$f"
done

summary
if grep -qv $'\tok\t' "$STEPS"; then
  exit 1
fi
exit 0
