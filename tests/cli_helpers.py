"""Shared by the CLI tests: run ``moebalance.cli.main`` in this process."""

import torch

from moebalance import cli


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` in this process: ``(status, stdout, stderr)`` (argparse's SystemExit included)."""
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
