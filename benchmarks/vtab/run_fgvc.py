"""FGVC sweep (VPT protocol): ``run.py --benchmark fgvc`` with the same flags.

    python benchmarks/vtab/run_fgvc.py --data-root FGVC_DIR --tasks all --methods sds_lora \
        lora full linear --seeds 0 1 2 --model vit_base --out runs/fgvc
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.vtab.run import main as _main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--benchmark" in argv:
        raise SystemExit("run_fgvc.py always runs --benchmark fgvc; use run.py for VTAB")
    return _main(["--benchmark", "fgvc", *argv])


if __name__ == "__main__":
    sys.exit(main())
