"""Peer comparison: Avalanche 0.6's strategies against ours on the same streams and pretrained backbones.

One command runs the grid (each run in its own process, finished runs skipped), writes
``benchmarks/results/peers.json`` and prints the Markdown table (mean ± std over seeds)::

    python -m benchmarks.peers [--quick] [--seeds 0 1 2] [--train-per-class N] [--update-results-md]

Modules: ``grid`` (what runs: streams, methods, sizes), ``avalanche_runs`` (Avalanche's strategies on our
EfficientNet-Lite0 trunk for images, our MiniLM trunk for text), ``ours`` (our strategies through
``cl.run.run``), ``worker`` (one run in a subprocess), ``report`` (aggregation, table, RESULTS.md section).
"""
