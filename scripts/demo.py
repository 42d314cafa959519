"""Same as `sds-vision demo ...`: offline demo on CPU (add --quick for a < 30 s smoke run)."""

import sys

from sds_vision.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
