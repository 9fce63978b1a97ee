"""Test configuration: `slow` reproductions run only with --runslow (or MTLJAX_RUNSLOW=1)."""

import os

import jax
import pytest

jax.config.update("jax_enable_x64", False)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("MTLJAX_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow reproduction: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
