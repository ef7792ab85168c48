"""benchmarks.tau_curve: the commands it runs, how it counts expansions and compares parameters."""

from __future__ import annotations

import argparse
import json

from benchmarks.tau_curve import REFERENCES, cl_args, scans, with_ratios


def test_cl_args_set_the_subset_and_threads():
    args = argparse.Namespace(config="examples/default.yaml", train_per_class=500, test_per_class=None, threads=1)
    assert cl_args(args, ["--set", "strategy.tau=4"]) == [
        "cl", "run", "examples/default.yaml", "--set", "strategy.tau=4", "--set", "scenario.train_per_class=500",
        "--set", "threads=1"]
    assert cl_args(args, REFERENCES["adapter_per_task"])[3:5] == ["--strategy", "adapter_per_task"]


def test_scans_count_the_expansions_after_the_first_experience(tmp_path):
    events = [(0, "expansion")] * 3 + [(1, "reuse"), (1, "expansion"), (2, "expansion"), (2, "warm_start")]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps({"experience": e, "kind": k}) for e, k in events))
    assert scans(path) == (2, 3)


def test_ratios_are_against_adapter_per_task():
    points = [{"label": "sema tau=8", "params_functional": 50}, {"label": "adapter_per_task", "params_functional": 200}]
    assert [p["params_functional_vs_apt"] for p in with_ratios(points)] == [0.25, 1.0]
    assert with_ratios([{"label": "sema tau=2", "params_functional": 5}])[0]["params_functional_vs_apt"] is None
