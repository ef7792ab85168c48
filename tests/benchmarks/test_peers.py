"""``python -m benchmarks.peers --quick``: every method yields a row with its metrics; finished runs are skipped."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.peers.__main__ import main
from benchmarks.peers.grid import AVALANCHE_METHODS, OUR_METHODS, TEXT_METHODS, RunSpec, build_grid
from benchmarks.peers.report import markdown, summarize_runs

pytestmark = [pytest.mark.slow, pytest.mark.realdata]  # Debian FashionMNIST and fortunes; random-init backbones


def test_quick_grid_has_every_method_and_resumes(tmp_path, capsys, restore_threads):
    out, work = tmp_path / "peers", tmp_path / "work"
    argv = ["--quick", "--weights", "none", "--out", str(out), "--work", str(work)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "peers.json").read_text())
    assert summary["quick"] and summary["command"].startswith("python -m benchmarks.peers --quick")
    assert summary["machine"]["cpus"] and not summary["missing"] and not summary["class_order_problems"]
    got = {(r["stream"], r["framework"], r["method"]) for r in summary["rows"]}
    want = {("fmnist", "ours", m) for m in OUR_METHODS} | {("fmnist", "avalanche", m) for m in AVALANCHE_METHODS}
    want |= {("fortunes", "ours", m) for m in TEXT_METHODS} | {("fortunes", "avalanche", m) for m in AVALANCHE_METHODS}
    assert got == want
    for r in summary["rows"]:
        for m in ("final_accuracy", "avg_incremental_accuracy", "avg_forgetting", "learning_accuracy"):
            assert 0.0 <= r[m] <= 1.0, (r, m)
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mb"] > 0 and r["seeds"] == [0]
    for run in summary["runs"]:
        assert len(run["accuracy_matrix"]) == 5 and len(run["accuracy_matrix"][-1]) == 5
    # Avalanche saw the very stream (class order) our runs saw, on images and on text
    for stream in ("fmnist", "fortunes"):
        orders = {json.dumps(r["class_order"]) for r in summary["runs"] if r["spec"]["stream"] == stream}
        assert len(orders) == 1, stream
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("*.json")}
    assert len(stamps) == len(summary["runs"])
    capsys.readouterr()

    assert main(argv) == 0  # a second invocation runs nothing
    assert capsys.readouterr().out.count("done, skipped") == len(stamps)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.json")} == stamps


def test_subset_changes_are_new_runs_and_table_shows_mean_and_std():
    specs = build_grid([0, 1], {"fmnist": (10, 5), "fortunes": (None, None)}, ["fmnist"], ["avalanche:naive"])
    assert [s.key for s in specs] == ["fmnist-avalanche-naive-s0", "fmnist-avalanche-naive-s1"]
    assert specs[0].scenario == {"name": "split_fmnist", "n_experiences": 5, "seed": 0, "train_per_class": 10,
                                 "test_per_class": 5}
    runs = [{"spec": s.to_dict(), "accuracy_matrix": [[a]], "final_accuracy": a, "avg_incremental_accuracy": a,
             "avg_forgetting": 0.1, "wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mb": 100.0}
            for s, a in zip(specs, (0.5, 0.7), strict=True)]
    rows = summarize_runs(runs)
    assert rows[0]["seeds"] == [0, 1] and rows[0]["final_accuracy"] == pytest.approx(0.6)
    assert rows[0]["learning_accuracy"] == pytest.approx(0.6)
    assert "**0.6000 ± 0.1414**" in markdown(rows, {"fmnist": "heading"})
    assert RunSpec(**specs[0].to_dict()) == specs[0]


def test_avalanche_text_path_computes_what_prepare_does_and_trains_the_trunk(restore_threads):
    from benchmarks.peers.avalanche_runs import TokenizedText, TrunkClassifier, make_strategy, tokenized
    from benchmarks.peers.grid import RANDOM_WEIGHTS
    from cl.registry import BACKBONES, SCENARIOS
    from scenarios.sources.avalanche import to_avalanche

    torch.manual_seed(0)
    stream = SCENARIOS.create("split_fortunes", n_experiences=5, seed=0, train_per_class=6, test_per_class=4)
    backbone = BACKBONES.create("minilm", **RANDOM_WEIGHTS["minilm"])
    model = TrunkClassifier(backbone).eval()
    texts = [stream[0].test[i][0] for i in range(5)]
    tokens = torch.stack([TokenizedText(stream[0].test, backbone)[i][0] for i in range(5)])
    assert tokens.shape == (5, 2, backbone.data_config.max_length)
    with torch.no_grad():  # pre-tokenised, trimmed batches = the backbone's own prepare on the strings
        want = model.classifier(backbone(backbone.prepare(texts)))
        assert torch.allclose(model(tokens), want, atol=1e-5)

    trunk_before = [p.detach().clone() for p in backbone.parameters()]
    strategy = make_strategy("replay", model)  # replay concatenates stored and new token batches
    benchmark = to_avalanche(tokenized(stream, backbone))
    for exp in list(benchmark.train_stream)[:2]:
        strategy.train(exp)
    assert any(not torch.equal(a, b) for a, b in zip(trunk_before, backbone.parameters(), strict=True))
    assert model.classifier.classifier.out_features > max(stream[0].classes + stream[1].classes)


def test_text_trunk_checkpointing_keeps_the_gradients(restore_threads):
    from benchmarks.peers.avalanche_runs import TokenizedText, TrunkClassifier
    from benchmarks.peers.grid import RANDOM_WEIGHTS
    from cl.registry import BACKBONES, SCENARIOS

    stream = SCENARIOS.create("split_fortunes", n_experiences=5, seed=0, train_per_class=4, test_per_class=2)
    grads = []
    for checkpoint in (True, False):
        torch.manual_seed(0)
        backbone = BACKBONES.create("minilm", **RANDOM_WEIGHTS["minilm"])
        model = TrunkClassifier(backbone).train()  # dropout on: the recomputation must replay it
        assert backbone.model.is_gradient_checkpointing
        if not checkpoint:
            backbone.model.gradient_checkpointing_disable()
        data = TokenizedText(stream[0].train, backbone)
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = torch.tensor([data[i][1] for i in range(len(data))]) % 2
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in backbone.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
