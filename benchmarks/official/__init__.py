"""Our ``sema`` and ``mos`` side by side with the official SEMA and MOS code (``python -m benchmarks.official``).

The official code is not part of the project: it is read from checkouts given by path (``checkouts.py``).
"""
