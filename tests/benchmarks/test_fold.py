"""``python -m benchmarks.fold --quick`` runs and reports both sides (figures of a smoke run mean nothing)."""

from __future__ import annotations

import json

from benchmarks.fold import main


def test_quick_fold_benchmark_reports_both_sides(tmp_path, restore_threads):
    out = tmp_path / "fold.json"
    main(["--quick", "--threads", "1", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["folded img/s"] > 0 and row["unfolded img/s"] > 0
    assert float(row["max |diff|"]) < 1e-3  # folding changes the embedding only by float rounding
