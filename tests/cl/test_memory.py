"""ExperienceMemory: exact search against numpy, filters, removal, persistence, crashes mid-save, bad input."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import cl.memory.index as memory_index
import cl.memory.memory as memory_module
import cl.memory.persist as persist
from cl.errors import CheckpointError, ConfigError, DataError
from cl.memory import KINDS, ExperienceMemory

faiss.omp_set_num_threads(1)
D = 16
ROOT = Path(__file__).resolve().parents[2]


def data(n: int, seed: int = 0, dim: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def metas(n: int, kinds=KINDS) -> list[dict]:
    return [{"kind": kinds[i % len(kinds)], "experience": i % 3, "class": i % 5, "adapter": f"a{i % 2}", "i": i}
            for i in range(n)]


def brute(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and row indices of the k nearest rows of x for each query (numpy reference)."""
    s = q @ x.T if metric == "ip" else ((q[:, None, :] - x[None]) ** 2).sum(-1)
    order = np.argsort(-s if metric == "ip" else s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))


@pytest.fixture
def mem_and_data():
    x, m = data(400), metas(400)
    mem = ExperienceMemory(D, index="flat")
    ids = mem.add(x, m)
    return mem, x, m, ids


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_matches_brute_force_per_kind_and_across_kinds(metric):
    x, m, q = data(500), metas(500), data(7, seed=1)
    mem = ExperienceMemory(D, metric=metric)
    ids = mem.add(x, m)
    assert ids.tolist() == list(range(500)) and len(mem) == 500 and mem.structures()["prototype"] == "flat"
    kinds = np.array([r["kind"] for r in m])
    for kind in KINDS:
        rows = np.flatnonzero(kinds == kind)
        scores, order = brute(x[rows], q, 10, metric)
        hits = mem.search(q, 10, kind=kind)
        np.testing.assert_array_equal(hits.ids, ids[rows][order])
        np.testing.assert_allclose(hits.scores, scores, rtol=1e-4, atol=1e-4)
        assert all(h["kind"] == kind for row in hits.metadata for h in row)
    scores, order = brute(x, q, 10, metric)
    hits = mem.search(q, 10)  # all kinds merged
    np.testing.assert_array_equal(hits.ids, order)
    np.testing.assert_allclose(hits.scores, scores, rtol=1e-4, atol=1e-4)
    assert [h.metadata["i"] for h in hits[0]] == order[0].tolist()
    two = mem.search(q, 5, kind=["task", "prototype"])
    rows = np.flatnonzero(np.isin(kinds, ["task", "prototype"]))
    np.testing.assert_array_equal(two.ids, rows[brute(x[rows], q, 5, metric)[1]])


@pytest.mark.parametrize("threshold", [1000, 10], ids=["subset-brute-force", "subset-idselector"])
def test_filters_are_exact(mem_and_data, threshold):
    mem, x, m, ids = mem_and_data
    mem.config.exact_threshold = threshold  # 10: the filtered subsets go through an IDSelector on the flat index
    q = data(5, seed=2)
    cases = [
        ("exemplar", {"experience": 1}),
        ("exemplar", {"class": 2, "adapter": "a0"}),
        ("prototype", {"class_": [1, 3]}),
        (None, {"experience": [0, 2]}),
        ("task", {"adapter": "a1", "experience": 0}),
    ]
    for kind, filters in cases:
        want = "class" if "class_" in filters else None
        f = {(want or k): v for k, v in filters.items()}
        keep = np.array([(kind is None or r["kind"] == kind)
                         and all(r[c] in (v if isinstance(v, list) else [v]) for c, v in f.items()) for r in m])
        rows = np.flatnonzero(keep)
        hits = mem.search(q, 8, kind=kind, **filters)
        np.testing.assert_array_equal(hits.ids, ids[rows][brute(x[rows], q, 8, "ip")[1]], err_msg=str(filters))
        assert mem.count(kind, **filters) == len(rows)
        np.testing.assert_array_equal(mem.ids(kind, **filters), ids[rows])
    few = mem.search(q, 50, kind="exemplar", experience=1, **{"class": 2})  # 6 entries match: padded to k
    assert (few.ids[:, :6] >= 0).all() and (few.ids[:, 6:] == -1).all() and np.isneginf(few.scores[:, 6:]).all()
    assert len(few.metadata[0]) == 6 and len(few[0]) == 6
    assert (mem.search(q, 3, experience=7).ids == -1).all()
    assert mem.count("exemplar", adapter=None) == 0


def test_remove_keeps_ids_stable_and_hides_removed(mem_and_data):
    mem, x, _, ids = mem_and_data
    gone = ids[::3]
    mem.remove(gone)
    assert len(mem) == 400 - len(gone)
    kept = np.setdiff1d(ids, gone)
    got = mem.get(kept[::-1])
    np.testing.assert_array_equal(got.vectors, x[kept[::-1]])
    assert [g["i"] for g in got.metadata] == kept[::-1].tolist()
    hits = mem.search(x, 20)
    assert not np.isin(hits.ids, gone).any()
    np.testing.assert_array_equal(hits.ids, kept[brute(x[kept], x, 20, "ip")[1]])
    new = mem.add(data(3, seed=9), metas(3))
    assert new.tolist() == [400, 401, 402]  # ids are never reused
    with pytest.raises(DataError, match=r"1 id\(s\) are not in the memory: 0"):
        mem.remove([0, 1])
    assert 1 in mem.ids()  # nothing was removed by the failed call
    with pytest.raises(DataError, match="not in the memory"):
        mem.get([3])


def test_filtered_results_follow_changes(mem_and_data):
    mem, x, _, _ = mem_and_data
    q = x[:2]
    assert mem.search(q, 3, kind="exemplar", experience=0).ids[0, 0] == 0  # caches the subset and its vectors
    mem.remove([0])
    assert 0 not in mem.search(q, 3, kind="exemplar", experience=0).ids
    new = mem.add(x[:1], {"kind": "exemplar", "experience": 0})
    assert mem.search(q, 1, kind="exemplar", experience=0).ids[0, 0] == new[0]
    mem.update(new, experience=1)
    assert new[0] not in mem.search(q, 3, kind="exemplar", experience=0).ids
    assert mem.search(q, 1, kind="exemplar", experience=1).ids[0, 0] == new[0]


def test_helpers_entries_vectors_update(mem_and_data):
    mem, x, m, ids = mem_and_data
    e = mem.entries("prototype", experience=2)
    rows = [i for i, r in enumerate(m) if r["kind"] == "prototype" and r["experience"] == 2]
    np.testing.assert_array_equal(e.ids, rows)
    np.testing.assert_array_equal(e.vectors, x[rows])
    assert e.metadata[0] == {**m[rows[0]]}
    vid, vec = mem.vectors(["task", "exemplar"])
    rows = [i for i, r in enumerate(m) if r["kind"] in ("task", "exemplar")]
    np.testing.assert_array_equal(vid, rows)
    np.testing.assert_array_equal(vec, x[rows])
    mem.update(ids[:2], adapter=7, experience=None, note="x", i=None)
    assert mem.get(ids[:2]).metadata[1] == {"kind": KINDS[1], "experience": None, "class": 1, "adapter": 7,
                                            "note": "x"}
    assert mem.count(adapter=7) == 2
    with pytest.raises(DataError, match="kind cannot be updated"):
        mem.update(ids[:1], kind="task")
    with pytest.raises(DataError, match="'class' must be an int"):
        mem.update(ids[:1], class_="three")


def test_save_load_round_trip_identical_neighbours(tmp_path):
    x, q = data(900), data(20, seed=3)
    mem = ExperienceMemory(D, tmp_path / "mem", metric="l2", index="hnsw")
    meta = [{"kind": "exemplar", "experience": i % 4} for i in range(600)] + metas(300, ("prototype",))
    ids = mem.add(x, meta)
    mem.remove(ids[:50])
    assert mem.structures() == {"exemplar": "hnsw", "prototype": "hnsw"}
    before = mem.search(q, 10)
    filtered = mem.search(q, 10, kind="exemplar", experience=[1, 2])
    assert mem.save() == tmp_path / "mem"
    loaded = ExperienceMemory.load(tmp_path / "mem")
    assert len(loaded) == len(mem) == 850 and loaded.counts() == mem.counts()
    assert loaded.structures() == mem.structures() and loaded.config == mem.config and loaded.metric == "l2"
    assert loaded.index_settings() == mem.index_settings()  # the tuned efSearch and its sample recall
    assert loaded._indexes["exemplar"].tuning == mem._indexes["exemplar"].tuning
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert after.metadata == before.metadata
    np.testing.assert_array_equal(loaded.search(q, 10, kind="exemplar", experience=[1, 2]).ids, filtered.ids)
    assert not np.isin(after.ids, ids[:50]).any()  # tombstones survive the round trip
    assert loaded.add(data(1), {"kind": "task"}).tolist() == [900]
    loaded.save()
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == ["CURRENT", "gen-000002"]


def blobs(n: int, seed: int, dim: int = D, centers: int = 20) -> np.ndarray:
    """Points around a fixed set of cluster centres (the same centres for every seed)."""
    c = np.random.default_rng(123).standard_normal((centers, dim)) * 3
    rng = np.random.default_rng(seed)
    return (c[rng.integers(centers, size=n)] + rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_auto_index_becomes_a_tuned_ivf_on_clustered_data(metric):
    x, q = blobs(3000, 0), blobs(100, 1)
    if metric == "ip":  # cosine
        x, q = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    mem = ExperienceMemory(D, metric=metric, exact_threshold=1000)
    for s in range(0, 3000, 500):
        mem.add(x[s : s + 500], [{"kind": "exemplar", "class": i % 10} for i in range(s, s + 500)])
        assert mem.structures()["exemplar"] == ("flat" if s + 500 <= 1000 else "ivf")
    settings = mem.index_settings()["exemplar"]
    assert settings["sample_recall"] >= 0.97 and settings["scan"] <= 0.5 and settings["nprobe"] < settings["nlist"]
    ids = mem.search(q, 10, kind="exemplar").ids
    assert recall(ids, brute(x, q, 10, metric)[1]) >= 0.95
    rows = np.arange(3, 3000, 10)  # class 3: 300 ids <= threshold, searched exactly
    np.testing.assert_array_equal(mem.search(q, 10, class_=3).ids, rows[brute(x[rows], q, 10, metric)[1]])
    rows = np.flatnonzero(np.arange(3000) % 10 < 5)  # 1500 ids > threshold: IDSelector, nprobe widened
    assert recall(mem.search(q, 10, class_=[0, 1, 2, 3, 4]).ids, rows[brute(x[rows], q, 10, metric)[1]]) >= 0.95
    gone = np.arange(0, 3000, 2)[:800]
    mem.remove(gone)
    keep = np.setdiff1d(np.arange(3000), gone)
    assert recall(mem.search(q, 10).ids, keep[brute(x[keep], q, 10, metric)[1]]) >= 0.95


def test_auto_index_stays_exact_where_ivf_would_scan_most_vectors():
    dim = 64  # i.i.d. vectors: no structure for an index to use
    x, q = data(5000, seed=0, dim=dim), data(50, seed=1, dim=dim)
    mem = ExperienceMemory(dim, exact_threshold=1000)
    mem.add(x[:1250], {"kind": "exemplar"})
    ix = mem._indexes["exemplar"]
    assert mem.structures() == {"exemplar": "flat"} and ix.tuning.next_probe == 4 * 1250  # asks again at 4x
    flat = ix.index
    mem.add(x[1250:4999], {"kind": "exemplar"})
    assert ix.index is flat and ix.tuning.next_probe == 5000  # no trial below next_probe: adds went into it
    mem.add(x[4999:], {"kind": "exemplar"})
    assert mem.structures() == {"exemplar": "flat"} and ix.tuning.next_probe == 20_000
    np.testing.assert_array_equal(mem.search(q, 10).ids, brute(x, q, 10, "ip")[1])
    assert mem.index_settings()["exemplar"]["sample_recall"] == 1.0


def test_ivf_retunes_when_doubled_and_retrains_when_quadrupled():
    x = blobs(10_000, 0, centers=200)
    mem = ExperienceMemory(D, metric="l2", exact_threshold=1000)
    mem.add(x[:1600], {"kind": "exemplar"})
    ix = mem._indexes["exemplar"]
    first = ix.index
    assert ix.structure == "ivf" and ix.tuning.tuned_at == ix.tuning.trained_at == 1600 and first.nlist == 32
    mem.add(x[1600:3199], {"kind": "exemplar"})
    assert ix.index is first and ix.tuning.tuned_at == 1600  # incremental: no tuning before twice the size
    mem.add(x[3199:3200], {"kind": "exemplar"})
    assert ix.index is first and ix.tuning.tuned_at == 3200 and ix.tuning.trained_at == 1600  # retuned in place
    mem.add(x[3200:6400], {"kind": "exemplar"})  # 4x the trained size, and sqrt(n) wants more lists: retrained
    assert ix.index is not first and ix.index.nlist == 128 and ix.tuning.trained_at == 6400
    mem.add(x[6400:], {"kind": "exemplar"})
    q = blobs(100, 1, centers=200)
    assert recall(mem.search(q, 10).ids, brute(x, q, 10, "l2")[1]) >= 0.95


def test_explicit_search_settings_are_kept_and_tuned_ones_survive_a_reload(tmp_path):
    x = blobs(3000, 0)
    fixed = ExperienceMemory(D, metric="l2", exact_threshold=1000, nprobe=3)
    fixed.add(x, {"kind": "exemplar"})
    assert fixed.index_settings()["exemplar"]["nprobe"] == 3
    hnsw = ExperienceMemory(D, metric="l2", index="hnsw", ef_search=20)
    hnsw.add(x, {"kind": "exemplar"})
    assert hnsw.index_settings()["exemplar"]["ef_search"] == 20
    mem = ExperienceMemory(D, tmp_path / "m", metric="l2", exact_threshold=1000)
    mem.add(x[:2000], {"kind": "exemplar"})
    tuned = mem.index_settings()
    mem.save()
    loaded = ExperienceMemory.load(tmp_path / "m")
    assert loaded.index_settings() == tuned and loaded._indexes["exemplar"].tuning.tuned_at == 2000
    loaded.add(x[2000:3999], {"kind": "exemplar"})  # below twice the tuned size: no retuning after the reload
    assert loaded._indexes["exemplar"].tuning.tuned_at == 2000


def test_hnsw_tombstones_compaction_and_held_out_tuning():
    x, q = blobs(3000, 0), blobs(100, 1)
    mem = ExperienceMemory(D, metric="l2", index="hnsw")
    for s in range(0, 3000, 1000):
        mem.add(x[s : s + 1000], [{"kind": "exemplar", "class": i % 10} for i in range(s, s + 1000)])
    ix = mem._indexes["exemplar"]
    assert ix.tuning.tuned_at == 2000 and ix.tuning.recall >= 0.97  # tuned on 300 rows held back from the batch
    assert recall(mem.search(q, 10).ids, brute(x, q, 10, "l2")[1]) >= 0.95
    mem.remove(np.arange(0, 3000, 2)[:500])  # 500 tombstones (17%): hidden by an IDSelector
    assert len(ix.removed) == 500
    assert not np.isin(mem.search(q, 10).ids, np.arange(0, 1000, 2)).any()
    ef = ix.ef_search()
    mem.remove(np.arange(0, 3000, 2)[500:800])  # 800 (27%): compacts, keeps its tuned efSearch
    assert len(ix.removed) == 0 and mem.structures()["exemplar"] == "hnsw" and ix.ef_search() == ef
    keep = np.setdiff1d(np.arange(3000), np.arange(0, 3000, 2)[:800])
    assert recall(mem.search(q, 10).ids, keep[brute(x[keep], q, 10, "l2")[1]]) >= 0.95


def test_default_settings_recall_on_50k_random_vectors():
    """ExperienceMemory(dim=128) with 50k i.i.d. vectors, filled as a run would: recall@10 >= 0.95 (issue 14)."""
    dim = 128
    x, q = data(50_000, seed=0, dim=dim), data(200, seed=1, dim=dim)
    mem = ExperienceMemory(dim)
    for s in range(0, 50_000, 10_000):
        mem.add(x[s : s + 10_000], {"kind": "exemplar"})
    truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    assert recall(mem.search(q, 10).ids, truth) >= 0.95
    assert recall(np.vstack([mem.search(v, 10).ids for v in q[:50]]), truth[:50]) >= 0.95  # one query per call


def test_ivf_trains_once_at_threshold_and_round_trips(tmp_path):
    x, q = data(4000), data(30, seed=5)
    mem = ExperienceMemory(D, tmp_path / "m", index="ivf", exact_threshold=2000, nprobe=64)
    mem.add(x[:2000], {"kind": "exemplar"})
    assert mem.structures() == {"exemplar": "flat"}
    mem.add(x[2000:3000], {"kind": "exemplar"})
    ivf = mem._indexes["exemplar"].index
    assert mem.structures() == {"exemplar": "ivf"} and ivf.is_trained
    mem.add(x[3000:], {"kind": "exemplar"})
    assert mem._indexes["exemplar"].index is ivf  # later adds go into the trained index
    mem.remove(np.arange(100))
    keep = np.arange(100, 4000)
    hits = mem.search(q, 10)
    assert recall(hits.ids, keep[brute(x[keep], q, 10, "ip")[1]]) >= 0.95
    np.testing.assert_array_equal(mem.get([150, 3999]).vectors, x[[150, 3999]])
    mem.save()
    np.testing.assert_array_equal(ExperienceMemory.load(tmp_path / "m").search(q, 10).ids, hits.ids)


def test_torch_and_single_vector_inputs():
    mem = ExperienceMemory(D)
    t = torch.from_numpy(data(10)).double()
    ids = mem.add(t, [{"kind": "adapter_key", "adapter": i} for i in range(10)])
    hits = mem.search(t[3], 2, kind="adapter_key")  # a single [dim] query
    assert hits.ids.shape == (1, 2) and hits.ids[0, 0] == ids[3] and hits[0][0].metadata["adapter"] == 3
    mem.remove(torch.tensor(ids[:2]))
    assert len(mem) == 8


def test_bad_input_errors_say_what_to_do():
    mem = ExperienceMemory(D)
    with pytest.raises(DataError, match=r"dimension 8, this memory holds dimension 16 \(expected \[n, 16\]\)"):
        mem.add(data(2, dim=8), metas(2))
    with pytest.raises(DataError, match="queries have dimension 8"):
        mem.search(data(2, dim=8), 1)
    bad = data(3)
    bad[1, 4], bad[2, 0] = np.nan, np.inf
    with pytest.raises(DataError, match=r"NaN or inf in 2 row\(s\): 1, 2"):
        mem.add(bad, metas(3))
    with pytest.raises(DataError, match="NaN or inf"):
        mem.search(bad, 1)
    with pytest.raises(DataError, match="got 3 vectors but 2 metadata dicts"):
        mem.add(data(3), metas(2))
    with pytest.raises(DataError, match="metadata row 1: unknown kind 'prototypes'; did you mean 'prototype'"):
        mem.add(data(2), [{"kind": "task"}, {"kind": "prototypes"}])
    with pytest.raises(DataError, match="metadata row 0 has no 'kind'"):
        mem.add(data(1), [{"class": 1}])
    with pytest.raises(DataError, match="'experience' must be an int"):
        mem.add(data(1), [{"kind": "task", "experience": 1.5}])
    with pytest.raises(DataError, match="JSON-serializable"):
        mem.add(data(1), [{"kind": "task", "blob": object()}])
    with pytest.raises(DataError, match="must be real numbers"):
        mem.add(np.array([["a"] * D]), metas(1))
    assert len(mem) == 0  # every failed add left the memory unchanged
    mem.add(data(5), metas(5))
    with pytest.raises(ConfigError, match="unknown memory kind 'adapter_keys'; did you mean 'adapter_key'"):
        mem.search(data(1), 3, kind="adapter_keys")
    for k in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="k must be a positive int"):
            mem.search(data(1), k)
    with pytest.raises(ConfigError, match="unknown memory filter 'experiment'; did you mean 'experience'"):
        mem.search(data(1), 3, experiment=1)
    with pytest.raises(ConfigError, match="unknown memory index 'hnws'"):
        ExperienceMemory(D, index="hnws")
    with pytest.raises(ConfigError, match="unknown memory metric 'cos'"):
        ExperienceMemory(D, metric="cos")
    with pytest.raises(ConfigError, match="no path"):
        mem.save()


def test_load_rejects_missing_foreign_corrupted_and_newer(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ExperienceMemory.load(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is not an experience memory"):
        ExperienceMemory.load(tmp_path / "other")
    with pytest.raises(ConfigError, match="exists and is not an experience memory"):
        ExperienceMemory(D, tmp_path / "other")
    path = tmp_path / "mem"
    mem = ExperienceMemory(D, path)
    mem.add(data(50), metas(50))
    mem.save()
    with pytest.raises(ConfigError, match="already holds an experience memory; open it with"):
        ExperienceMemory(D, path)
    gen = path / (path / "CURRENT").read_text().strip()
    index_file = gen / "index-exemplar.faiss"
    blob = bytearray(index_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    index_file.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"index-exemplar.faiss does not match its sha256 checksum \(truncated"):
        ExperienceMemory.load(path)
    mem.save()  # a fresh generation
    gen = path / (path / "CURRENT").read_text().strip()
    manifest = json.loads((gen / "manifest.json").read_text())
    (gen / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"format version 99, written by a newer clagent.*upgrade clagent"):
        ExperienceMemory.load(path)
    (gen / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        ExperienceMemory.load(path)
    (path / "CURRENT").write_text("gen-000077\n")
    with pytest.raises(CheckpointError, match="corrupted: CURRENT names 'gen-000077'"):
        ExperienceMemory.load(path)


def test_failed_save_leaves_previous_memory_and_is_cleaned_up(tmp_path, monkeypatch):
    path = tmp_path / "mem"
    mem = ExperienceMemory(D, path)
    mem.add(data(100), metas(100))
    mem.save()
    mem.add(data(10, seed=1), metas(10))
    real_replace = os.replace
    for fail_at in ("write_index", "rename", "swap"):
        def boom(*a, fail_at=fail_at, **kw):
            raise OSError(f"simulated crash at {fail_at}")

        if fail_at == "write_index":
            monkeypatch.setattr(memory_module.faiss, "write_index", boom)
        else:
            monkeypatch.setattr(persist.os, "replace", lambda src, dst, fail_at=fail_at: (
                boom() if (fail_at == "swap") == (Path(dst).name == "CURRENT") else real_replace(src, dst)))
        with pytest.raises(OSError, match="simulated"):
            mem.save()
        monkeypatch.undo()
        assert len(ExperienceMemory.load(path)) == 100
        assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "gen-000001"]  # the failed save cleaned up
    (path / "gen-000007.tmp").mkdir()  # what a killed save leaves: removed by the next save
    mem.save()
    assert len(ExperienceMemory.load(path)) == 110
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "gen-000008"]


def test_retained_generations_survive_saves_and_still_load(tmp_path):
    path = tmp_path / "mem"
    mem = ExperienceMemory(D, path)
    mem.add(data(30), metas(30))
    mem.save()
    persist.retain(path, ["gen-000001"])  # what a checkpoint pins before the next save
    mem.add(data(5, seed=1), metas(5))
    mem.save()
    mem.save()
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "KEEP", "gen-000001", "gen-000003"]
    assert len(ExperienceMemory.load(path, generation="gen-000001")) == 30  # resuming from that checkpoint
    assert len(ExperienceMemory.load(path)) == 35
    persist.retain(path, [])
    persist.prune(path)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "KEEP", "gen-000003"]
    with pytest.raises(CheckpointError, match=r"has no generation 'gen-000001' \(it holds gen-000003\)"):
        ExperienceMemory.load(path, generation="gen-000001")


def test_disk_full_during_save_keeps_the_previous_generation(tmp_path, monkeypatch):
    path = tmp_path / "mem"
    mem = ExperienceMemory(D, path)
    mem.add(data(40), metas(40))
    mem.save()
    mem.add(data(5, seed=1), metas(5))
    monkeypatch.setattr(memory_module.faiss, "write_index",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        mem.save()
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "gen-000001"]
    assert len(ExperienceMemory.load(path)) == 40


CHILD = """
import sys
import faiss
import numpy as np
from cl.memory import ExperienceMemory
faiss.omp_set_num_threads(1)
mem = ExperienceMemory.load(sys.argv[1], verify=False)
rng = np.random.default_rng(int(sys.argv[2]))
print("ready", flush=True)
while True:
    mem.add(rng.standard_normal((20, mem.dim)).astype("float32"), {"kind": "exemplar", "experience": 9})
    print("begin", flush=True)
    mem.save()
    print("end", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_during_save_leaves_every_previous_entry(tmp_path):
    path, n, dim = tmp_path / "mem", 40_000, 64
    x = data(n, dim=dim)
    mem = ExperienceMemory(dim, path, index="flat")
    ids = mem.add(x, [{"kind": "exemplar", "class": i % 7} for i in range(n)])
    t0 = time.perf_counter()
    mem.save()
    t_save = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    mid_save = 0
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(trial)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0, 3 * t_save))
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0].split()
        assert proc.returncode == -signal.SIGKILL
        mid_save += bool(out) and out[-1] == "begin"
        loaded = ExperienceMemory.load(path)
        added = loaded.count(experience=9)
        assert len(loaded) == n + added and added % 20 == 0
        got = loaded.get(ids[::97])
        np.testing.assert_array_equal(got.vectors, x[::97])
        assert [m["class"] for m in got.metadata] == (ids[::97] % 7).tolist()
    print(f"save {t_save:.3f} s, {mid_save}/6 kills inside save()")
    assert mid_save >= 1  # at least one kill landed inside save()


def test_gpu_code_path_with_a_stand_in_device(monkeypatch):
    """The GPU mirror (sync on add, rebuild after remove, position -> id map) checked with a CPU clone."""
    monkeypatch.setattr(memory_module, "gpu_available", lambda: True)
    clones = []
    monkeypatch.setattr(memory_index, "_gpu_clone", lambda index: clones.append(1) or faiss.clone_index(index))
    x, q = data(600), data(9, seed=4)
    for index in ("flat", "ivf"):
        gpu = ExperienceMemory(D, index=index, exact_threshold=300, gpu=True)
        cpu = ExperienceMemory(D, index=index, exact_threshold=300, gpu=False)
        for mem in (gpu, cpu):
            mem.add(x[:400], {"kind": "exemplar"})
        np.testing.assert_array_equal(gpu.search(q, 7).ids, cpu.search(q, 7).ids)
        for mem in (gpu, cpu):
            mem.add(x[400:], {"kind": "exemplar"})
            mem.remove(np.arange(0, 400, 3))
            mem.add(x[:5] + 1, {"kind": "exemplar"})
        np.testing.assert_array_equal(gpu.search(q, 7).ids, cpu.search(q, 7).ids)
        np.testing.assert_array_equal(gpu.search(q, 7, class_=None).ids, cpu.search(q, 7).ids)  # filtered: CPU
    assert len(clones) == 4  # one mirror per index, rebuilt once after the remove


# ---- kinds and fields of one's own --------------------------------------------------------------------------------
def documents(n: int) -> list[dict]:
    """Metadata of a kind of one's own: declared fields (source, page, score, public) and an undeclared one (lang)."""
    return [{"kind": "document", "source": ("wiki", "book", "web")[i % 3], "page": i, "score": i / 10,
             "public": i % 2 == 0, "lang": ("en", "fr")[i % 2]} for i in range(n)]


FIELDS = {"source": str, "page": int, "score": float, "public": bool}


def test_a_kind_and_fields_of_ones_own_store_filter_exactly_and_round_trip(tmp_path):
    x, q = data(300), data(5, seed=1)
    mem = ExperienceMemory(D, tmp_path / "mem", kinds=["document"], fields=FIELDS)
    assert mem.kinds == (*KINDS, "document") and mem.fields == {"source": "str", "page": "int", "score": "float",
                                                                "public": "bool"}
    m = documents(200) + metas(100)
    ids = mem.add(x, m)
    assert mem.counts()["document"] == 200
    assert mem.get(ids[:1]).metadata[0] == {"kind": "document", "experience": None, "class": None, "adapter": None,
                                            **m[0]}
    cases = [({"source": "wiki"}, lambda r: r["source"] == "wiki"),
             ({"page": [3, 4, 5], "public": True}, lambda r: r["page"] in (3, 4, 5) and r["public"]),
             ({"lang": "fr", "source": ["book", "web"]}, lambda r: r["lang"] == "fr" and r["source"] != "wiki"),
             ({"score": 1.5}, lambda r: r["score"] == 1.5)]
    for filters, keep in cases:
        rows = [i for i, r in enumerate(m) if r["kind"] == "document" and keep(r)]
        assert mem.count("document", **filters) == len(rows), filters
        np.testing.assert_array_equal(mem.ids("document", **filters), ids[rows])
        k = min(3, len(rows))
        _, order = brute(x[rows], q, k, "ip")
        np.testing.assert_array_equal(mem.search(q, k, kind="document", **filters).ids, ids[rows][order])
    assert mem.count(lang="en") == 100 and mem.count(kind=None, source=None) == 100  # unset: the 100 built-in rows
    mem.update(ids[:2], source="notes", lang="de")
    assert mem.count("document", source="notes", lang="de") == 2

    mem.save()
    loaded = ExperienceMemory.load(tmp_path / "mem")
    assert loaded.kinds == mem.kinds and loaded.fields == mem.fields
    for filters, _ in cases:
        np.testing.assert_array_equal(loaded.search(q, 3, kind="document", **filters).ids,
                                      mem.search(q, 3, kind="document", **filters).ids)
    assert loaded.get(ids[:5]).metadata == mem.get(ids[:5]).metadata
    assert loaded.add(data(1), {"kind": "document", "page": 1}).tolist() == [300]


def test_declared_fields_are_indexed_columns():
    """Filters on a declared field stay fast: SQLite answers them from the field's index, not a scan."""
    mem = ExperienceMemory(D, kinds=["document"], fields={"source": str})
    mem.add(data(50), documents(50))
    where, params = mem._store._where(["document"], {"source": ["wiki"]})
    plan = " ".join(str(r) for r in mem._store.conn.execute(f"EXPLAIN QUERY PLAN SELECT id FROM entries{where}",
                                                             params))
    assert "USING INDEX entries_field_source" in plan or "USING COVERING INDEX entries_field_source" in plan, plan


def test_declaring_later_moves_stored_values_to_a_typed_column():
    mem = ExperienceMemory(D)
    mem.declare(kinds="document")
    ids = mem.add(data(20), documents(20))
    assert mem.count("document", page=3) == 1  # undeclared: filters from the JSON
    with pytest.raises(DataError, match=r"field 'lang' cannot be declared int: 20 entries hold values of another"):
        mem.declare(fields={"lang": int})
    assert mem.fields == {}  # the refused declaration changed nothing
    mem.declare(fields={"page": int, "lang": "str"})
    assert mem.fields == {"page": "int", "lang": "str"}
    assert mem.get(ids[3:4]).metadata[0]["page"] == 3 and mem.count("document", page=3) == 1
    assert mem._store.conn.execute("SELECT COUNT(*) FROM entries WHERE extra LIKE '%\"page\"%'").fetchone()[0] == 0
    mem.declare(fields={"page": int})  # again: a no-op
    with pytest.raises(ConfigError, match="field 'page' is already declared int, not str"):
        mem.declare(fields={"page": str})


BAD_OWN_CALLS = {
    "add: a kind nobody declared": (
        lambda m: m.add(data(1), {"kind": "documnet"}), DataError,
        r"unknown kind 'documnet'; did you mean 'document'\? \(kinds: exemplar, adapter_key, prototype, task, "
        r"document; declare a kind of your own with ExperienceMemory\(dim, kinds=\[...\]\) or "
        r"memory.declare\(kinds=\[...\]\)\)"),
    "search: a kind nobody declared": (
        lambda m: m.search(data(1), 1, kind="report"), ConfigError,
        r"unknown memory kind 'report' \(kinds: .*document"),
    "filter: a key nothing holds": (
        lambda m: m.search(data(1), 1, kind="document", src="wiki"), ConfigError,
        r"unknown memory filter 'src'; did you mean 'source'\? \(filters: experience, class \(or class_\), adapter, "
        r"source, page, lang; a key of your own filters once an entry holds it, or declare it"),
    "add: a declared field of another type": (
        lambda m: m.add(data(1), {"kind": "document", "page": "3"}), DataError,
        r"metadata row 0: 'page' is declared int, got '3'"),
    "update: a declared field of another type": (
        lambda m: m.update([0], page=1.5), DataError, r"'page' is declared int, got 1.5"),
    "declare: a built-in key": (lambda m: m.declare(fields={"class": int}), ConfigError, r"field 'class' is built in"),
    "declare: an unknown type": (lambda m: m.declare(fields={"when": "date"}), ConfigError,
                                 r"field 'when': unknown type 'date' \(choose one of str, int, float, bool\)"),
    "declare: a kind that is no name": (lambda m: m.declare(kinds=["../x"]), ConfigError,
                                        r"kind name '../x' must be 1-64 letters, digits or underscores"),
}


@pytest.mark.parametrize("case", BAD_OWN_CALLS)
def test_errors_about_ones_own_kinds_and_fields_list_what_exists(case):
    mem = ExperienceMemory(D, kinds=["document"], fields={"source": str, "page": int})
    mem.add(data(3), [{"kind": "document", "source": "wiki", "page": 1, "lang": "en"}] * 3)
    call, error, match = BAD_OWN_CALLS[case]
    with pytest.raises(error, match=match):
        call(mem)


def _tamper(path: Path, manifest_change=None, sql: str | None = None) -> None:
    import hashlib
    import sqlite3

    gen = path / (path / "CURRENT").read_text().strip()
    if sql is not None:
        conn = sqlite3.connect(gen / "metadata.sqlite")
        with conn:
            conn.execute(sql)
        conn.close()
    manifest = json.loads((gen / "manifest.json").read_text())
    if manifest_change is not None:
        manifest_change(manifest)
    for fname, info in manifest["files"].items():
        blob = (gen / fname).read_bytes()
        info.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (gen / "manifest.json").write_text(json.dumps(manifest))


OWN_TAMPERING = {
    "a field's type changed in the manifest": (
        {"manifest_change": lambda m: m["fields"].update(page="str")}, r"types its fields \[\('source', 'TEXT'\), "
        r"\('page', 'INTEGER'\)\], its manifest \[\('source', 'TEXT'\), \('page', 'TEXT'\)\]"),
    "a column the manifest does not declare": (
        {"sql": "ALTER TABLE entries ADD COLUMN secret TEXT"}, r"has columns \[.*'secret'\], expected"),
    "a field left out of the manifest": (
        {"manifest_change": lambda m: m["fields"].pop("page")}, r"has columns \[.*'page'\], expected"),
    "a row of another type in a field": (
        {"sql": "UPDATE entries SET page = 'three' WHERE id = 0"}, r"has 1 malformed rows"),
    "a row of a kind the manifest does not know": (
        {"manifest_change": lambda m: m["kinds"].pop("document")}, r"has 3 malformed rows"),
    "a kind that is no name": (
        {"manifest_change": lambda m: m["kinds"].update({"../../x": {"file": None}})}, r"invalid manifest"),
    "a field that is built in": (
        {"manifest_change": lambda m: m["fields"].update({"id": "int"})}, r"invalid manifest"),
}


@pytest.mark.parametrize("case", OWN_TAMPERING)
def test_a_memory_with_own_kinds_refuses_what_a_save_never_writes(tmp_path, case):
    tamper, says = OWN_TAMPERING[case]
    mem = ExperienceMemory(D, tmp_path / "mem", kinds=["document"], fields={"source": str, "page": int})
    mem.add(data(3), [{"kind": "document", "source": "wiki", "page": 1}] * 3)
    mem.save()
    ExperienceMemory.load(tmp_path / "mem")  # as saved: loads
    _tamper(tmp_path / "mem", **tamper)
    with pytest.raises(CheckpointError, match=says):
        ExperienceMemory.load(tmp_path / "mem")
