"""``cl sweep``: a grid of runs over a base config, each in its own directory, then one report.

A sweep is a base config, a grid (``key: [values]``, crossed) and seeds. Run ``i`` of the grid goes
to ``OUT/<key>=<value>,...,seed=<s>``; a finished run is skipped when the sweep is started again and
an unfinished one continues from its checkpoint (``run`` resumes a directory holding the same
config). After every run ``OUT/report.html`` is rewritten over all the sweep's runs, and
``OUT/sweep.yaml`` records the sweep so ``cl sweep OUT/sweep.yaml`` repeats it.

A sweep file is YAML::

    base: examples/default.yaml      # or `config:` with the settings inline
    grid:
      strategy.name: [simplecil, sema]
      strategy.lr: [0.001, 0.01]     # keys of a component that a grid value renames must exist on both
    seeds: [0, 1, 2]
    set: ["threads=1"]               # --set overrides for every run
    out: runs/sweep
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl.config import RunConfig, apply_override, build_config, read_yaml, resolve, to_dict
from cl.errors import CLError, ConfigError
from cl.run import run, same_config
from cl.rundir import is_run_dir

COMPONENTS = ("scenario", "backbone", "strategy")
SWEEP_KEYS = {"base", "config", "grid", "seeds", "set", "out", "loggers"}
UNSAFE = re.compile(r"[^A-Za-z0-9._+=:,\[\]-]+")  # characters kept in run directory names
SWEEP_ONLY = SWEEP_KEYS - {"out", "loggers"}  # a YAML with one of these is a sweep file, else a run config


@dataclass
class Sweep:
    """A base config crossed with a grid of values and a list of seeds."""

    base: dict[str, Any]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] | None = None
    overrides: list[str] = field(default_factory=list)
    out: Path = Path("runs/sweep")
    loggers: list[str] | None = None

    def points(self) -> list[dict[str, Any]]:
        """Every combination of grid values (grid order, the last key varying fastest), seed last."""
        keys = list(self.grid)
        combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]
        if self.seeds is not None:
            combos = [{**c, "seed": s} for c in combos for s in self.seeds]
        return combos

    def config(self, point: dict[str, Any], name: str | None = None) -> RunConfig:
        """The resolved run config of one grid point (in ``out/name``)."""
        data = copy.deepcopy(self.base)
        components = {}
        rest = {}
        for key, value in point.items():
            comp = key.removesuffix(".name")
            if comp in COMPONENTS and (key == comp or key.endswith(".name")):
                components[comp] = str(value)
            else:
                rest[key] = value
        cfg = build_config(data, None, components)  # renaming a component drops the old one's params
        data = to_dict(cfg)
        for item in self.overrides:
            apply_override(data, item)
        for key, value in rest.items():
            set_key(data, key, value)
        if self.loggers is not None:
            data["loggers"] = list(self.loggers)
        data["out"] = str(self.out / (name or run_name(point)))
        return resolve(build_config(data))

    def manifest(self) -> dict[str, Any]:
        return {"config": self.base, "grid": self.grid, "seeds": self.seeds, "set": self.overrides,
                "out": str(self.out), **({"loggers": self.loggers} if self.loggers is not None else {})}


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"grid key {key!r}: {p!r} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def run_name(point: dict[str, Any]) -> str:
    """``strategy.name=sema,seed=0``: the grid point as a directory name."""
    if not point:
        return "base"
    parts = []
    for key, value in point.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={UNSAFE.sub('-', text) or '-'}")
    return ",".join(parts)


def run_names(points: list[dict[str, Any]]) -> list[str]:
    """Directory names of grid points; values that read the same after cleaning get a short hash."""
    names = [run_name(p) for p in points]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            digest = hashlib.sha1(json.dumps(points[i], sort_keys=True, default=str).encode()).hexdigest()[:6]
            names[i] = f"{name},{digest}"
    return names


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``--grid key=v1,v2`` items -> ``{key: [v1, v2]}`` (values parsed as YAML: ``0.1`` is a float)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like key=value1,value2 (e.g. strategy.name=simplecil,sema)")
        key, text = item.split("=", 1)
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {item!r}: cannot read the values ({e})") from None
        if not key.strip() or not values:
            raise ConfigError(f"--grid {item!r} names no key or no values")
        grid[key.strip()] = values
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None


def load_sweep(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base config data, sweep settings) from a YAML that is either a sweep file or a plain run config."""
    if path is None:
        return {}, {}
    data = read_yaml(path)
    if not SWEEP_ONLY & set(data):
        return data, {}
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)} (valid: {sorted(SWEEP_KEYS)})")
    if "base" in data and "config" in data:
        raise ConfigError(f"{path}: give the base config as `base:` (a file) or `config:` (inline), not both")
    base = data.get("config") or {}
    if "base" in data:
        base_path = Path(data["base"])
        base = read_yaml(base_path if base_path.is_absolute() or base_path.exists() else Path(path).parent / base_path)
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: `grid` must map each key to a non-empty list of values")
    return base, {**data, "grid": grid}


def is_finished(cfg: RunConfig) -> bool:
    """The directory holds this very run, with every experience done."""
    out = Path(cfg.out)
    try:
        on_disk = build_config(read_yaml(out / "config.yaml"))
        metrics = json.loads((out / "metrics.json").read_text())
    except (CLError, OSError, json.JSONDecodeError):
        return False
    done, total = metrics.get("experiences_done"), metrics.get("n_experiences")
    return same_config(on_disk, cfg) and done is not None and done == total


def prepare_sweep_dir(out: Path) -> None:
    """Create the sweep directory, or accept one a sweep made (it holds ``sweep.yaml``), an empty one, or one that
    holds only clagent run directories (runs of the sweep started on their own). Any other folder is refused: the
    sweep writes ``sweep.yaml`` and ``report.html`` there and must not replace a user's files (its runs are guarded
    by ``cl.run`` like any run directory)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a sweep directory: pass --out a new or empty directory, or a sweep's")
    foreign = [p for p in out.iterdir() if not (p.is_dir() and is_run_dir(p))] if out.is_dir() else []
    if foreign and not (out / "sweep.yaml").is_file():
        raise ConfigError(f"{out} is a folder that no sweep made (no sweep.yaml) and not empty: clagent never writes "
                          "into such a folder; pass --out a new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the sweep directory {out}: {e.strerror or e}; pass --out a directory you "
                          "can write") from None


def run_sweep(sweep: Sweep, console: Console | None = None, report: bool = True) -> dict[str, str]:
    """Run every grid point not finished yet; returns ``{run dir: status}`` (done, skipped, failed: ...)."""
    console = console or Console()
    points = sweep.points()
    configs = [(n, sweep.config(p, n)) for n, p in zip(run_names(points), points, strict=True)]  # all checked first
    prepare_sweep_dir(sweep.out)
    (sweep.out / "sweep.yaml").write_text(yaml.safe_dump(sweep.manifest(), sort_keys=False))
    status: dict[str, str] = {}
    for k, (name, cfg) in enumerate(configs):
        console.rule(f"[bold]{k + 1}/{len(configs)}[/] {escape(name)}")
        if is_finished(cfg):
            status[cfg.out] = "skipped (finished)"
            console.print(f"{escape(str(cfg.out))}: finished already, skipped")
            continue
        try:
            run(cfg, console=console)
            status[cfg.out] = "done"
        except CLError as e:
            status[cfg.out] = f"failed: {e}"
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        except Exception as e:  # one broken grid point must not lose the others
            status[cfg.out] = f"failed: {type(e).__name__}: {e}"
            console.print(traceback.format_exc(), highlight=False, markup=False)
        if report and k + 1 < len(configs):  # a live view of the sweep so far
            write_sweep_report(sweep, [c for _, c in configs], console, quiet=True)
    table = Table(title=escape(f"sweep {sweep.out}"))
    table.add_column("run")
    table.add_column("status")
    for out, s in status.items():
        table.add_row(escape(Path(out).name), escape(s))
    console.print(table)
    if report:
        path = write_sweep_report(sweep, [c for _, c in configs], console)
        if path is not None:
            console.print(f"report: {escape(str(path))}")
    return status


def write_sweep_report(sweep: Sweep, configs: list[RunConfig], console: Console, quiet: bool = False) -> Path | None:
    from cl.report import write_report

    dirs = [c.out for c in configs if (Path(c.out) / "config.yaml").exists()]
    if not dirs:
        return None
    try:
        return write_report(dirs, sweep.out / "report.html", title=f"clagent sweep: {sweep.out}")
    except Exception as e:  # the runs are the product; a report that fails only warns
        if not quiet:
            console.print(f"[yellow]warning:[/] could not write the sweep report: {type(e).__name__}: {escape(str(e))}")
        return None


def build_sweep(
    path: str | None, grid: list[str], seeds: str | None, overrides: list[str], out: str | None,
    loggers: list[str] | None = None, **top: Any,
) -> Sweep:
    """A Sweep from a sweep file or base config plus the ``cl sweep`` options (options win over the file)."""
    base, spec = load_sweep(path)
    for key, value in top.items():
        if value is not None:
            base[key] = value
    merged_grid = {**spec.get("grid", {}), **parse_grid(grid)}
    seed_list = parse_seeds(seeds) if seeds else spec.get("seeds")
    default_out = f"runs/sweep-{Path(path).stem}" if path else "runs/sweep"
    return Sweep(
        base=base, grid=merged_grid, seeds=[int(s) for s in seed_list] if seed_list is not None else None,
        overrides=[*spec.get("set", []), *overrides], out=Path(out or spec.get("out") or default_out),
        loggers=loggers if loggers is not None else spec.get("loggers"),
    )
