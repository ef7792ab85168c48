"""What a report shows, read from run directories: one ``RunData`` per run, ``RunGroup``s of seeds.

Reading never writes into a run directory and never waits: a run still going (its lock is held)
or one that stopped early is read as far as it got, from ``metrics.json`` when it exists and from
the ``eval`` events of ``events.jsonl`` otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import json
import shlex
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cl.errors import ConfigError
from cl.metrics import as_matrix, forgetting_per_experience

# Config keys that do not change a run's results, plus the seed: runs equal on everything else are one group.
IGNORED_FOR_GROUPING = {"seed", "out", "device", "threads", "progress", "cache_max_gb", "loggers", "eval.batch_size"}


@dataclass
class RunData:
    """One run directory, read as far as it got."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    events: list[dict[str, Any]]
    status: str  # "finished" | "running" | "incomplete"
    n_experiences: int | None
    accuracy_matrix: list[list[float]]
    accuracy_seen: list[float]
    wall_time_per_experience_s: list[float] = field(default_factory=list)
    peak_rss_mb_per_experience: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def experiences_done(self) -> int:
        return len(self.accuracy_matrix)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def status_text(self) -> str:
        done, total = self.experiences_done, self.n_experiences or "?"
        if self.status == "finished":
            return f"finished ({done} experiences)"
        if self.status == "running":
            return f"in progress: {done} of {total} experiences done (a clagent process holds its lock)"
        return (f"in progress or interrupted: {done} of {total} experiences done, no process holds its lock "
                f"(continue with `cl run --resume {shlex.quote(str(self.path))}`)")

    @property
    def forgetting(self) -> list[float]:
        return forgetting_per_experience(self.accuracy_matrix) if self.accuracy_matrix else []

    def events_of(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") in kinds]

    def adapters_per_layer(self) -> dict[str, list[float]]:
        """Adapters in each layer's pool after each experience, from expansion/reuse events (carried forward)."""
        counts: dict[str, dict[int, float]] = defaultdict(dict)
        for e in self.events_of("expansion", "reuse"):
            if e.get("layer") is not None and e.get("adapters") is not None and e.get("experience") is not None:
                counts[str(e["layer"])][int(e["experience"])] = float(e["adapters"])
        n = max(self.experiences_done, max((max(c) + 1 for c in counts.values()), default=0))
        out: dict[str, list[float]] = {}
        for layer, by_exp in sorted(counts.items(), key=lambda kv: _layer_key(kv[0])):
            series, last = [], 0.0
            for i in range(n):
                last = by_exp.get(i, last)
                series.append(last)
            out[layer] = series
        return out

    def route_usage(self) -> dict[int, dict[str, float]]:
        """Share of routing weight per adapter in each experience, from ``route`` events (``usage: {adapter: w}``)."""
        usage: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for e in self.events_of("route"):
            if e.get("experience") is None or not isinstance(e.get("usage"), dict):
                continue
            for name, w in e["usage"].items():
                usage[int(e["experience"])][str(name)] += float(w)
        out = {}
        for i, u in sorted(usage.items()):
            total = sum(u.values()) or 1.0
            out[i] = {k: v / total for k, v in sorted(u.items())}
        return out

    def retrieval_hit_rate(self) -> dict[int, float]:
        """Hit rate per experience from ``retrieval`` events (``hits`` and ``queries``, or ``hit_rate``)."""
        hits: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        rates: dict[int, list[float]] = defaultdict(list)
        for e in self.events_of("retrieval"):
            if e.get("experience") is None:
                continue
            i = int(e["experience"])
            if e.get("hits") is not None and e.get("queries"):
                hits[i][0] += float(e["hits"])
                hits[i][1] += float(e["queries"])
            elif e.get("hit_rate") is not None:
                rates[i].append(float(e["hit_rate"]))
        out = {i: h / q for i, (h, q) in hits.items() if q}
        out.update({i: float(np.mean(r)) for i, r in rates.items() if i not in out})
        return dict(sorted(out.items()))

    def expansion_checks(self) -> list[dict[str, Any]]:
        """One row per expansion/reuse decision: experience, layer, decision, min z-score (None without test), tau."""
        rows = []
        for e in self.events_of("expansion", "reuse"):
            z = e.get("zscores") or {}
            rows.append({
                "experience": e.get("experience"), "layer": e.get("layer"), "kind": e["kind"],
                "adapter": e.get("adapter"), "adapters": e.get("adapters"), "tau": e.get("tau"),
                "min_z": min(z.values()) if isinstance(z, dict) and z else None, "zscores": z,
            })
        return rows


@dataclass
class RunGroup:
    """Runs whose configs are equal except for the seed (and settings that do not change results)."""

    label: str
    runs: list[RunData]

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    @property
    def runs_text(self) -> str:
        """How many runs the group has and their seeds, e.g. ``1 (seed 0)``, ``3 (seeds 0, 1, 2)``."""
        n = len(self.runs)
        return f"{n} (seed{'s' if n > 1 else ''} {', '.join(map(str, self.seeds))})"

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    def stacked(self, get: Any, length: int | None = None) -> np.ndarray:
        """``[n_runs, length]`` of a per-experience series, NaN-padded (partial runs are shorter)."""
        series = [list(get(r)) for r in self.runs]
        n = length or max((len(s) for s in series), default=0)
        out = np.full((len(series), n), np.nan)
        for i, s in enumerate(series):
            out[i, : min(n, len(s))] = s[:n]
        return out

    def mean_std(self, get: Any, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-position mean and sample std (ddof=1; 0 where one run has a value) over the runs, ignoring NaN."""
        x = self.stacked(get, length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(x, axis=0)
            std = np.nanstd(x, axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1])
        return mean, np.nan_to_num(std, nan=0.0)

    def matrix_mean(self) -> np.ndarray:
        """Mean accuracy matrix ``[T, T]`` over the runs (NaN where no run measured)."""
        n = max((max(len(r.accuracy_matrix), *(len(x) for x in r.accuracy_matrix)) for r in self.runs
                 if r.accuracy_matrix), default=0)
        mats = [_pad(as_matrix(r.accuracy_matrix, n), n) for r in self.runs if r.accuracy_matrix]
        if not mats:
            return np.zeros((0, 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(mats), axis=0)

    def scalar(self, key: str) -> tuple[float, float, int]:
        """Mean, sample std and count of a metrics.json number over the runs that have it."""
        values = [float(r.metrics[key]) for r in self.runs if isinstance(r.metrics.get(key), (int, float))]
        values = [v for v in values if not np.isnan(v)]
        if not values:
            return float("nan"), float("nan"), 0
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return float(np.mean(values)), std, len(values)


def _pad(m: np.ndarray, n: int) -> np.ndarray:
    out = np.full((n, n), np.nan)
    out[: min(n, m.shape[0]), : min(n, m.shape[1])] = m[:n, :n]
    return out


def _layer_key(layer: str) -> tuple[int, Any]:
    try:
        return (0, int(layer))
    except ValueError:
        return (1, layer)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def lock_held(run_dir: Path) -> bool:
    """True while a clagent process holds ``RUN/.lock`` (a run going on); never creates the file."""
    lock = run_dir / ".lock"
    if not lock.exists():
        return False
    try:
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    return False


def read_events(path: Path) -> list[dict[str, Any]]:
    """``events.jsonl``, skipping a half-written last line; an experience started twice keeps its last attempt."""
    if not path.exists():
        return []
    events: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict):
            events.append(e)
    last_start: dict[Any, int] = {}
    for i, e in enumerate(events):
        if e.get("kind") == "experience_start":
            last_start[e.get("experience")] = i
    return [e for i, e in enumerate(events)
            if e.get("experience") not in last_start or i >= last_start[e.get("experience")]
            or e.get("experience") is None]


def load_run(path: str | Path) -> RunData:
    """Read one run directory; raises ConfigError when ``path`` is not one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not a run directory (no config.yaml); pass a directory written by `cl run`")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}/config.yaml is malformed: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}/config.yaml does not hold a run config")
    metrics: dict[str, Any] = {}
    if (path / "metrics.json").exists():
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except json.JSONDecodeError:
            metrics = {}
        check_metrics(path / "metrics.json", metrics)
    events = read_events(path / "events.jsonl")
    evals = [e for e in events if e.get("kind") == "eval" and e.get("experience") is not None]
    rows = [list(r) for r in metrics.get("accuracy_matrix", [])]
    seen = list(metrics.get("accuracy_seen", []))
    if len(evals) > len(rows):  # metrics.json lags behind (not written yet for this experience)
        rows = [list(e["accuracy"]) for e in evals]
        seen = [float(e["accuracy_seen"]) for e in evals]
    n_exp = metrics.get("n_experiences") or config.get("scenario", {}).get("n_experiences")
    done = len(rows)
    if n_exp is not None and done >= int(n_exp):
        status = "finished"
    elif lock_held(path):
        status = "running"
    else:
        status = "incomplete"
    wall = list(metrics.get("wall_time_per_experience_s", []))
    if len(wall) < done:
        wall = _durations(events)[:done] or wall
    return RunData(
        path=path, config=config, metrics=metrics, events=events, status=status,
        n_experiences=int(n_exp) if n_exp is not None else None, accuracy_matrix=rows, accuracy_seen=seen,
        wall_time_per_experience_s=wall, peak_rss_mb_per_experience=list(metrics.get("peak_rss_mb_per_experience", [])),
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


#: the metrics.json values the report reads, each with a test of its shape and the shape in words
_METRIC_SHAPES: dict[str, tuple[Any, str]] = {
    "accuracy_matrix": (lambda v: isinstance(v, list) and all(isinstance(r, list) and all(map(_is_number, r))
                                                              for r in v), "a list of rows of numbers"),
    "accuracy_seen": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"),
    "wall_time_per_experience_s": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"),
    "peak_rss_mb_per_experience": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers"),
    "n_experiences": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                      "a count of experiences"),
}


def check_metrics(path: Path, metrics: Any) -> None:
    """Raise ConfigError unless ``metrics`` (read from ``path``) has the shape ``cl run`` writes, where the report
    reads it."""
    what = None
    if not isinstance(metrics, dict):
        what = f"it holds a JSON {type(metrics).__name__}, not an object of metrics"
    else:
        for key, (ok, shape) in _METRIC_SHAPES.items():
            if key in metrics and not ok(metrics[key]):
                what = f"{key!r} must be {shape}, got {json.dumps(metrics[key])[:60]}"
                break
    if what is not None:
        raise ConfigError(f"{path} is not a clagent metrics file: {what}; remove it to report the run from its "
                          "events.jsonl")


def _durations(events: list[dict[str, Any]]) -> list[float]:
    start: dict[Any, float] = {}
    out = []
    for e in events:
        if e.get("kind") == "experience_start":
            start[e["experience"]] = e["t"]
        elif e.get("kind") == "eval" and e.get("experience") in start:
            out.append(float(e["t"] - start.pop(e["experience"])))
    return out


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: a run itself, or a folder of runs (e.g. a ``cl sweep --out``)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p} does not exist")
        if is_run_dir(p):
            found.append(p)
            continue
        children = sorted(c.parent for c in p.glob("*/config.yaml")) if p.is_dir() else []
        if not children:
            raise ConfigError(
                f"{p} is not a run directory (no config.yaml) and holds no runs; "
                "pass directories written by `cl run` or `cl sweep`"
            )
        found.extend(children)
    return list(dict.fromkeys(found))


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    return out


def group_runs(runs: list[RunData]) -> list[RunGroup]:
    """Runs equal but for the seed form one group; labels name what differs between groups."""
    keyed: dict[str, list[RunData]] = {}
    flats: dict[str, dict[str, Any]] = {}
    for r in runs:
        f = {k: v for k, v in flat(r.config).items() if k not in IGNORED_FOR_GROUPING}
        if f.get("scenario.seed") == r.seed:  # the class order follows the run seed (cl.config.resolve)
            f.pop("scenario.seed")
        key = json.dumps(f, sort_keys=True, default=str)
        keyed.setdefault(key, []).append(r)
        flats[key] = f
    keys = list(keyed)
    differing = _differing_keys([flats[k] for k in keys])
    groups = []
    for k in keys:
        members = sorted(keyed[k], key=lambda r: (str(r.seed), r.name))
        f = flats[k]
        if differing:
            label = _label(f, differing)
        else:
            c = members[0].config
            label = "/".join(str(c.get(s, {}).get("name", "?")) for s in ("scenario", "strategy", "backbone"))
        groups.append(RunGroup(label=label, runs=members))
    return groups


def _label(f: dict[str, Any], differing: list[str]) -> str:
    """A group's label from the keys that differ: a component's name as ``strategy=sema`` (the name alone when it
    is all that differs), other keys as ``strategy.lr=0.01``; ``imports`` only when nothing else differs (they
    register the components whose names already say what differs)."""
    keys = [d for d in differing if d != "imports"] or differing
    if len(keys) == 1 and keys[0].endswith(".name"):
        return _short(f.get(keys[0], "-"))
    return ", ".join(f"{d.removesuffix('.name')}={_short(f.get(d, '-'))}" for d in keys)


def _differing_keys(flats: list[dict[str, Any]]) -> list[str]:
    """Keys whose values differ between groups; a component's params are left out when its name differs."""
    if len(flats) < 2:
        return []
    keys = sorted({k for f in flats for k in f}, key=lambda k: (k.count("."), k))
    diff = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    renamed = {k.removesuffix(".name") for k in diff if k.endswith(".name")}
    return [k for k in diff if k.endswith(".name") or not any(k.startswith(r + ".") for r in renamed)]


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def load_runs(paths: list[str | Path]) -> list[RunData]:
    return [load_run(p) for p in find_runs(paths)]
