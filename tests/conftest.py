"""Test configuration: `slow` reproductions run only with --runslow (or MTLJAX_RUNSLOW=1).

The suite compiles hundreds of small programs, and on a 2-core CPU compiling is most of its
time. Tests therefore compile with LLVM at optimisation level 0 and XLA:CPU's faster-compiling
emitters (``TEST_XLA_FLAGS``, see ``tests/__init__.py``; set here before JAX starts and passed on
to the tests' subprocesses and notebook kernels): this takes most of the compile time off the
suite. It changes how fast the compiled code runs and, through float rounding, the last bits of
what it computes (which a long chaotic run, such as MGDA on the 2-D toy, can amplify); tests
judge with tolerances or robust outcomes, and benchmarks and users compile with XLA's defaults.
"""

import os

from tests import TEST_XLA_FLAGS

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh mtljax cache folder (``MTLJAX_CACHE``) for one test module."""
    folder = str(tmp_path_factory.mktemp("mtljax-cache"))
    old = os.environ.get("MTLJAX_CACHE")
    os.environ["MTLJAX_CACHE"] = folder
    yield folder
    if old is None:
        del os.environ["MTLJAX_CACHE"]
    else:
        os.environ["MTLJAX_CACHE"] = old


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("MTLJAX_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow reproduction: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
