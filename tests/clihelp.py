"""Shared by the command-line tests: run `sds-vision` in-process and collect its output."""

from sds_vision.cli import main


def run_cli(args, capsys):
    """``(exit code, stdout, stderr)`` of ``sds-vision ARGS``."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err
