"""Loggers: CSV and TensorBoard contents read back, a W&B offline run directory, resume without
repeated steps, and a broken backend that only warns."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cl.callbacks.logger import LoggerWarning
from cl.cli import main
from cl.config import build_config
from cl.run import run
from tests.helpers import tiny_config


def logged_config(tmp_path, loggers, **strategy):
    cfg = tiny_config(tmp_path, "finetune", epochs=2, **strategy)
    cfg["loggers"] = loggers
    cfg["threads"] = 1
    return cfg


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(logdir, tag):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_csv_rows_per_experience_and_epoch(tmp_path):
    metrics = run(logged_config(tmp_path, ["csv"]))
    out = tmp_path / "run" / "csv"
    rows = read_csv(out / "experiences.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert [float(r["accuracy_seen"]) for r in rows] == pytest.approx(metrics["accuracy_seen"])
    assert float(rows[-1]["accuracy/exp_0"]) == pytest.approx(metrics["accuracy_matrix"][-1][0])
    assert rows[0]["accuracy/exp_2"] == ""  # not measured yet after experience 0
    assert float(rows[-1]["avg_forgetting"]) == pytest.approx(metrics["avg_forgetting"])
    assert float(rows[1]["wall_time_s"]) == pytest.approx(metrics["wall_time_per_experience_s"][1])
    epochs = read_csv(out / "epochs.csv")
    assert [int(r["step"]) for r in epochs] == list(range(6))  # 3 experiences x 2 epochs
    assert [int(r["experience"]) for r in epochs] == [0, 0, 1, 1, 2, 2]
    assert all(float(r["loss"]) > 0 for r in epochs)


def test_tensorboard_scalars_read_back(tmp_path):
    metrics = run(logged_config(tmp_path, ["tensorboard"]))
    tb = tmp_path / "run" / "tensorboard"
    seen = scalars(tb / "experiences", "stream/accuracy_seen")
    assert [s for s, _ in seen] == [0, 1, 2]
    assert [v for _, v in seen] == pytest.approx(metrics["accuracy_seen"], abs=1e-6)
    assert [s for s, _ in scalars(tb / "experiences", "accuracy/exp_1")] == [1, 2]
    assert [s for s, _ in scalars(tb / "epochs", "epoch/loss")] == list(range(6))


def test_sema_pool_history_reaches_tensorboard(tmp_path):
    cfg = tiny_config(tmp_path, "sema", epochs=1, descriptor_epochs=2)
    cfg.update(loggers=["tensorboard"], threads=1)
    run(cfg)
    logdir = tmp_path / "run" / "tensorboard" / "experiences"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    layer = next(t for t in tags if t.startswith("adapters_per_layer/"))
    assert [v for _, v in scalars(logdir, layer)] == [1, 2, 3]  # synthetic classes always shift
    assert any(t.startswith("expansion/min_zscore/layer_") for t in tags)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, json
    from cl.callbacks.base import Callback
    from cl.run import run

    class KillInExperience2(Callback):
        def after_epoch(self, agent, exp, epoch, logs):
            if exp.id == 2 and epoch == 0:  # its first epoch is logged, its checkpoint is not written
                os.kill(os.getpid(), signal.SIGKILL)

    run(json.loads(sys.argv[1]), extra_callbacks=[KillInExperience2()])
    """
)


def test_resume_continues_steps_without_repeats(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = logged_config(tmp_path, ["csv", "tensorboard", "wandb"])
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = tmp_path / "run"
    assert [int(r["step"]) for r in read_csv(out / "csv" / "epochs.csv")] == [0, 1, 2, 3, 4]
    assert len(journal(out)) == 5 + 2  # the killed process's rows, epoch 4 (after the checkpoint) included
    run(build_config(cfg), resume=True)
    assert [int(r["step"]) for r in read_csv(out / "csv" / "epochs.csv")] == list(range(6))
    assert [int(r["step"]) for r in read_csv(out / "csv" / "experiences.csv")] == [0, 1, 2]
    assert [s for s, _ in scalars(out / "tensorboard" / "epochs", "epoch/loss")] == list(range(6))
    assert [s for s, _ in scalars(out / "tensorboard" / "experiences", "stream/accuracy_seen")] == [0, 1, 2]
    # one offline run left, holding the whole history: the killed process's directory is superseded by the replay
    (current,), (killed,) = offline_runs(out / "wandb"), offline_runs(out / "wandb" / "superseded")
    assert current.name.rsplit("-", 1)[1] == killed.name.rsplit("-", 1)[1]  # one W&B run id
    history = wandb_history(current)
    assert [h["experience"] for h in history if "experience/accuracy_seen" in h] == [0, 1, 2]
    assert [h["epoch"] for h in history if "epoch/loss" in h] == list(range(6))
    assert len(journal(out)) == 6 + 3


def offline_runs(folder):
    return sorted(p for p in folder.glob("offline-run-*") if p.is_dir())


def journal(out):
    return [json.loads(line) for line in (out / "wandb" / "history.jsonl").read_text().splitlines()]


def wandb_records(path):
    """Records of a finished W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version),
    then LevelDB log blocks of 32 KiB holding chunks (crc32 of type+data, length, type, data) of protobuf records.
    Raises on a torn or corrupt chunk, so a file that wandb has not finished writing fails loudly."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, records, buf = 7, [], b""
    while pos < len(data):
        if 32768 - pos % 32768 < 7:  # too little room for a chunk header: the rest of the block is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero fill at the end of a block
            pos += 32768 - pos % 32768
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(bytes([kind]) + chunk) == crc, f"torn chunk at {pos} of {path}"
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            records.append(r)
    return records


def wandb_history(run_dir):
    records = wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds, f"{run_dir} has no exit record: wandb has not finished writing it"
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_holds_per_experience_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = logged_config(tmp_path, ["console"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--logger", "wandb", "--no-report"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run_dirs = offline_runs(tmp_path / "run" / "wandb")
    assert len(run_dirs) == 1
    records = wandb_records(next(run_dirs[0].glob("run-*.wandb")))
    history = wandb_history(run_dirs[0])
    per_exp = [h for h in history if "experience/accuracy_seen" in h]
    assert [h["experience"] for h in per_exp] == [0, 1, 2]
    assert [h["experience/accuracy_seen"] for h in per_exp] == pytest.approx(metrics["accuracy_seen"])
    assert [h["epoch"] for h in history if "epoch/loss" in h] == list(range(6))
    assert any(h.get("accuracy_matrix/_type") == "table-file" for h in history)
    assert len(list(run_dirs[0].glob("files/media/table/accuracy_matrix_*.table.json"))) == 3
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    assert json.loads(next(u.value_json for u in config.update if u.key == "strategy"))["name"] == "finetune"
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key: u.value_json for u in r.summary.update if u.key})
    assert json.loads(summary["final_accuracy"]) == pytest.approx(metrics["final_accuracy"])


SIGKILL_PLUGIN = Path(__file__).with_name("sigkill_plugin.py")


def test_wandb_history_of_a_killed_process_survives_the_resume(tmp_path, monkeypatch):
    """SIGKILL right after experience 0's checkpoint: wandb-core dies with the rows it had not yet written to the
    offline run (it writes every 15 s); the journal has them and the resume replays them, so the W&B history of
    the run holds each row exactly once."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = tmp_path / "cfg.yaml"
    cfg = logged_config(tmp_path, ["console"])
    cfg["strategy"]["name"] = "finetune_sigkill"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CL_TEST_SIGKILL": "1"}
    cmd = [sys.executable, "-m", "cl", "run", str(path), "--logger", "wandb", "--import", str(SIGKILL_PLUGIN),
           "--no-report"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [(r.get("experience"), r.get("epoch")) for r in journal(out)] == [(None, 0), (None, 1), (0, None)]
    (killed,) = offline_runs(out / "wandb")
    assert main(["run", "--resume", str(out), "--import", str(SIGKILL_PLUGIN), "--no-report"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (current,) = offline_runs(out / "wandb")
    assert [p.name for p in offline_runs(out / "wandb" / "superseded")] == [killed.name]
    history = wandb_history(current)
    per_exp = [h for h in history if "experience/accuracy_seen" in h]
    assert [h["experience"] for h in per_exp] == [0, 1, 2]
    assert [h["experience/accuracy_seen"] for h in per_exp] == pytest.approx(metrics["accuracy_seen"])
    assert [h["epoch"] for h in history if "epoch/loss" in h] == list(range(6))
    assert len(list(current.glob("files/media/table/accuracy_matrix_*.table.json"))) == 3
    rows = journal(out)
    assert len(rows) == 6 + 3
    # the replayed row keeps the time the killed process logged it at
    assert per_exp[0]["_timestamp"] == pytest.approx(rows[2]["_timestamp"], abs=1e-3)


def test_a_backend_that_fails_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.warns(LoggerWarning, match="wandb logger switched off"):
        metrics = run(logged_config(tmp_path, ["wandb", "csv"]))
    assert metrics["experiences_done"] == 3
    assert len(read_csv(tmp_path / "run" / "csv" / "experiences.csv")) == 3  # the other logger is unaffected


def test_unknown_logger_fails_before_the_run(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(logged_config(tmp_path, ["console"])))
    assert main(["run", str(path), "--logger", "console,csvv"]) == 2
    assert "did you mean 'csv'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_loggers_are_listed(capsys):
    assert main(["list", "loggers"]) == 0
    out = capsys.readouterr().out
    for name in ("console", "csv", "tensorboard", "wandb", "report"):
        assert name in out, name
