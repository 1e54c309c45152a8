"""``python -m studio dataset``: every step of studio.dataset is a subcommand with its help."""

from __future__ import annotations

import pytest

from studio.cli import build_parser
from studio.dataset.cli import STEPS


def test_every_dataset_step_is_a_subcommand(capsys):
    assert STEPS == ("inspect", "caption", "mask", "crop")
    for step in STEPS:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["dataset", step, "--help"])
        assert exit_.value.code == 0
        assert "DIR" in capsys.readouterr().out.upper()
