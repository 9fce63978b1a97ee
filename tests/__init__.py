"""The test suite. ``TEST_XLA_FLAGS``: the XLA flags the tests compile with (see conftest.py),
set for the pytest process by conftest.py and for the tests' subprocesses by
``tests.helpers.subprocess_env``."""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
