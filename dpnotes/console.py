"""What every command does at the terminal: third-party noise off, user errors as one line.

    @command
    def main(argv=None): ...

`--debug` shows the traceback of a user error; `--verbose` lets library logs, warnings and progress
bars through (they are silenced by default: transformers load reports, FutureWarnings, DeepSpeed's
accelerator notices). Our own progress bars and summary tables are not affected. Both settings go to
the processes a command starts (through the environment), so a launched training run is as quiet as
the command that launched it.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable

from dpnotes.errors import UserError

EXIT_USER_ERROR = 2
VERBOSE_ENV, DEBUG_ENV = "DPNOTES_VERBOSE", "DPNOTES_DEBUG"
# Read by the libraries at import, also in the processes a command starts.
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DATASETS_VERBOSITY": "error",
                     "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "WANDB_SILENT": "true",
                     "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def add_console_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    parser.add_argument("--verbose", action="store_true", help="show third-party logs, warnings and progress bars")


def quiet_third_party(verbose: bool) -> None:
    """Silence other libraries' logs, warnings and progress bars, unless verbose."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.update(QUIET_ENVIRONMENT)
    # Libraries set their loggers' levels themselves when imported (DeepSpeed: INFO), so a level set
    # here would not hold: logging below ERROR is switched off process-wide instead (dpnotes prints).
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="dpnotes")  # our own warnings stay
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def command(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int | None]:
    """Wrap a command's `main(argv)`: quiet unless --verbose, a UserError printed as one line with
    exit status 2 unless --debug."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int | None:
        argv = list(sys.argv[1:] if argv is None else argv)
        verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV) == "1"
        debug = "--debug" in argv or os.environ.get(DEBUG_ENV) == "1"
        quiet_third_party(verbose)
        if debug:
            os.environ[DEBUG_ENV] = "1"
        try:
            return main(argv)
        except UserError as error:
            if debug:
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return run
