"""Performance benchmarks of clagent (``python -m benchmarks.run_all``; summary in ``benchmarks/RESULTS.md``).

Each benchmark is a module with ``run(quick: bool) -> dict`` and a ``main()`` that prints a table and, with
``--json PATH``, writes the result together with the machine it was measured on.
"""
