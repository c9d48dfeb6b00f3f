"""`msjax.cli.define_flag`: CLIs imported into one process share flags only with equal defaults."""

import importlib

import pytest
from absl import flags

from msjax.cli import define_flag


def test_shared_flag_reused_and_conflicting_default_refused():
    first = define_flag("float", "test_shared_flag", 1.0, "first")
    again = define_flag("float", "test_shared_flag", 1.0, "second")
    assert again.name == first.name and flags.FLAGS["test_shared_flag"].default == 1.0
    with pytest.raises(ValueError, match="test_shared_flag.*different defaults"):
        define_flag("float", "test_shared_flag", 1.05, "third")


def test_every_tool_imports_into_one_process():
    # A clash of defaults (msjax-serve's 1.05 repetition penalty against msjax-infer's 1.0) made
    # whichever tool was imported second silently run with the first one's default.
    for name in ("msjax.cli.infer", "msjax.cli.score", "msjax.cli.serve", "experiments.eval"):
        importlib.import_module(name)
    assert flags.FLAGS["repetition_penalty"].default == 1.0
    assert flags.FLAGS["default_repetition_penalty"].default == 1.05
