"""Same as `sds-vision finetune ...`: python scripts/finetune.py --data DIR --model ... --out DIR"""

import sys

from sds_vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
