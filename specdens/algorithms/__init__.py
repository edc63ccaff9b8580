"""Algorithms on operators: the Lanczos engine, probes, Gauss quadrature, SLQ and eigsh.

The public functions are re-exported from :mod:`specdens`; this package imports none of
its modules eagerly (``density`` and ``slq`` refer to each other).
"""
