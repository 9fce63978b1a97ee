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

# The xdist workers share the machine's cores: numpy's BLAS (OpenBLAS, whose idle threads spin)
# gets its share only, or the workers' BLAS threads and XLA's fight over the cores (on 2 cores
# with 2 workers, the conformance tests took 59 s instead of 35). Set before numpy loads (the
# `jax` import below loads it); subprocesses and notebook kernels inherit it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 0:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (_cores or 1) // _workers)))

from tests import TEST_XLA_FLAGS  # noqa: E402

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
