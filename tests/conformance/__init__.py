"""Conformance of every registered method: shared properties and float64 references.

``corpus.py`` generates the adversarial inputs from seeds, ``references.py`` holds the float64
references written from the papers and the per-case judge, ``properties.py`` the table of what
each method claims and the property checks; ``test_conformance.py`` runs them for every name in
``mtljax.methods.names()``. ``corpus.py`` and ``references.py`` import numpy and scipy only, so
that ``benchmarks/solver_accuracy.py`` loads them by path without importing the test package.
"""
