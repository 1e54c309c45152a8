"""``python -m studio dataset STEP DIR …``: one subcommand per module of :mod:`studio.dataset`.

Each step module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(ns) -> int``; the
modules are imported when their subcommand runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

STEPS = ("inspect", "caption", "mask", "crop")


def _module(step: str) -> Any:
    return importlib.import_module(f"studio.dataset.{step}")


def add_parser(sub: Any) -> None:
    """Add ``dataset`` and its step subcommands to the CLI's subparsers ``sub``."""
    d = sub.add_parser("dataset", help="prepare a folder of photos: " + ", ".join(STEPS))
    steps = d.add_subparsers(dest="step", required=True)
    for step in STEPS:
        module = _module(step)
        p = steps.add_parser(step, help=module.HELP, description=module.HELP)
        module.add_arguments(p)


def run(ns: argparse.Namespace) -> int:
    """Run the chosen step."""
    return int(_module(ns.step).run(ns))
