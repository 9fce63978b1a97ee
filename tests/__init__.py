"""The test suite. ``TEST_XLA_FLAGS``: the XLA flags the tests compile with (see conftest.py),
set for the pytest process by conftest.py and for the tests' subprocesses by
``tests.helpers.subprocess_env``.

* ``--xla_backend_optimization_level=0``: LLVM without optimisation.
* ``--xla_cpu_use_fusion_emitters=false`` and ``--xla_cpu_parallel_codegen_split_count=1``:
  XLA:CPU's elemental emitters and one code-generation thread; together with the first, a train
  step compiles about 5× faster on a 2-core CPU (measured on the tiny model's steps of ew,
  upgrad, mgda, nash_mtl, gradnorm and cagrad), and the compiled steps run as fast.

A flag this jaxlib does not know makes XLA abort, so the last two are used only when a
subprocess started with them runs (checked once per test run; the result is passed on to the
xdist workers in ``MTLJAX_TEST_XLA_FLAGS``).
"""

import os
import subprocess
import sys

_BASE_FLAGS = "--xla_backend_optimization_level=0"
_FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"


def _accepted(flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


if "MTLJAX_TEST_XLA_FLAGS" not in os.environ:
    _candidate = f"{_BASE_FLAGS} {_FAST_COMPILE_FLAGS}"
    os.environ["MTLJAX_TEST_XLA_FLAGS"] = _candidate if _accepted(_candidate) else _BASE_FLAGS

TEST_XLA_FLAGS = os.environ["MTLJAX_TEST_XLA_FLAGS"]
