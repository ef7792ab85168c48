"""The ``cl`` command: ``cl run``, ``cl sweep``, ``cl report`` and ``cl list`` (a thin layer over ``cl.run``,
``cl.sweep``, ``cl.report`` and the registries)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl.errors import CLError


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _run(args: argparse.Namespace) -> int:
    from cl.config import build_config, read_yaml, resolve
    from cl.run import load_run_config, run

    if args.nproc is not None and args.nproc < 1:
        raise CLError(f"--nproc must be at least 1 (got {args.nproc}): the number of processes to run")
    loggers = args.logger.split(",") if args.logger else None
    if args.resume:
        if args.config or args.strategy or args.scenario or args.backbone or args.seed is not None:
            raise CLError("--resume takes the config from RUN/config.yaml; drop the other config options "
                          "(--device, --logger, resume-safe --set keys and the --import flags confirming the "
                          "run's own imports may be given)")
        if args.out is not None or args.overwrite:
            option = "--out" if args.out is not None else "--overwrite"
            raise CLError(f"--resume {args.resume} continues the run in that directory; drop {option}")
        cfg = load_run_config(args.resume, args.set, imports=args.imports, device=args.device, loggers=loggers)
    else:
        data = read_yaml(args.config) if args.config else {}
        components = {"strategy": args.strategy, "scenario": args.scenario, "backbone": args.backbone}
        imports = [*data.get("imports", []), *args.imports] if args.imports else None
        cfg = build_config(data, args.set, components, seed=args.seed, out=args.out, loggers=loggers,
                           device=args.device, imports=imports)
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from cl.distributed import launch

        resolve(cfg)  # a bad config fails here, once, instead of in every rank
        return launch(args.nproc, _without_nproc(args.argv))
    run(cfg, resume=bool(args.resume), overwrite=args.overwrite, report=args.report)
    return 0


def _report(args: argparse.Namespace) -> int:
    from cl.report import find_runs, write_report

    runs = find_runs(args.runs)
    out = args.out or (str(Path(args.runs[0]) / "report.html") if len(args.runs) == 1 else "report.html")
    path = write_report(runs, out, title=args.title)
    Console().print(f"report ({len(runs)} run{'s' if len(runs) != 1 else ''}): {escape(str(path))}", highlight=False)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from cl.sweep import build_sweep, run_sweep

    loggers = args.logger.split(",") if args.logger else None
    sweep = build_sweep(args.config, args.grid, args.seeds, args.set, args.out, loggers=loggers, device=args.device)
    status = run_sweep(sweep, report=args.report)
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


#: where each registry's parameters are set, for ``cl list KIND NAME``
_SET_WITH = {"strategy": "--set strategy.{p}=VALUE (or the config's strategy: section)",
             "scenario": "--set scenario.{p}=VALUE (or the config's scenario: section)",
             "backbone": "--set backbone.{p}=VALUE (or the config's backbone: section)",
             "head": "a strategy's head_kw, e.g. --set 'strategy.head_kw={{{p}: VALUE}}'",
             "router": "a strategy's router_kw, e.g. --set 'strategy.router_kw={{{p}: VALUE}}'",
             "logger": "the logger itself (--logger NAME)"}


def _list(args: argparse.Namespace) -> int:
    from cl.plugins import import_plugins
    from cl.registry import BACKBONES, HEADS, LOGGERS, ROUTERS, SCENARIOS, STRATEGIES

    import_plugins(args.imports)
    console = Console()
    registries = (STRATEGIES, SCENARIOS, BACKBONES, HEADS, ROUTERS, LOGGERS)
    if args.kind and args.kind not in {k for r in registries for k in (r.kind, r.plural)}:
        owners = [r for r in registries if args.kind in r]
        hint = f"; for the {owners[0].kind} {args.kind!r}: cl list {owners[0].plural} {args.kind}" if owners else ""
        raise CLError(f"cl list: unknown kind {args.kind!r} (choose from {', '.join(r.plural for r in registries)})"
                      + hint)
    if args.name:
        if not args.kind:
            raise CLError("cl list NAME needs the kind first, e.g. cl list strategies sema")
        reg = next(r for r in registries if args.kind in (r.kind, r.plural))
        _print_params(console, reg, args.name)
        return 0
    for reg in registries:
        if args.kind and args.kind not in (reg.kind, reg.plural):
            continue
        table = Table(title=reg.plural)
        table.add_column("name", style="bold")
        table.add_column("description")
        for name in reg.names(args.pattern):
            table.add_row(name, escape(reg.describe(name)))
        console.print(table)
    return 0


def _print_params(console: Console, reg, name: str) -> None:
    """One entry's parameters: type, default and a line of its docstring each, and how to set them."""
    params = reg.params(name)  # an unknown name raises ConfigError with a suggestion
    console.print(f"[bold]{reg.kind} {escape(name)}[/]: {escape(reg.describe(name))}", highlight=False)
    if not params:
        console.print("no parameters")
        return
    table = Table()
    for column in ("parameter", "type", "default", "description"):
        table.add_column(column, style="bold" if column == "parameter" else None,
                         overflow="fold" if column == "description" else None)
    for p in params:
        table.add_row(p.name, escape(p.type), "required" if p.required else escape(repr(p.default)), escape(p.doc))
    console.print(table)
    console.print(escape(f"set with {_SET_WITH[reg.kind].format(p='NAME')}"), highlight=False)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose help may end with text computed only when help is shown (``more_help``), so that
    building the parser imports nothing heavy."""

    more_help: Callable[[], str] | None = None

    def format_help(self) -> str:
        text = super().format_help()
        return text + "\n" + self.more_help() + "\n" if self.more_help is not None else text


def _config_keys() -> str:
    from cl.config import keys_help

    return keys_help()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cl", description="clagent: continual learning with pretrained models")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a continual-learning stream")
    r.more_help = _config_keys
    r.add_argument("config", nargs="?", help="YAML config (defaults apply to anything left out)")
    r.add_argument("--strategy", help="strategy name (see `cl list strategies`)")
    r.add_argument("--scenario", help="scenario name")
    r.add_argument("--backbone", help="backbone name")
    r.add_argument("--seed", type=int)
    r.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    r.add_argument("--out", help="run directory (default runs/<scenario>-<strategy>-<backbone>-seed<N>)")
    r.add_argument("--logger", help="comma-separated loggers (default: console)")
    r.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import code that registers a strategy/scenario/backbone first, e.g. "
                        "examples/custom_strategy.py (repeatable; recorded in config.yaml)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set strategy.lr=0.01 or --set threads=1 (repeatable; the "
                        "keys are listed below)")
    r.add_argument("--resume", metavar="RUN",
                   help="continue the run in directory RUN with its config.yaml; --device, --logger, --report, "
                        "--nproc and resume-safe --set keys apply, any other config option (and --out, "
                        "--overwrite) is refused")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (only a clagent run directory, only once the new run is built; "
                        "any other non-empty folder is refused, never deleted)")
    r.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel processes on this machine (torchrun --standalone; docs/distributed.md)")
    r.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write the HTML dashboard RUN/report.html, refreshed during long runs (default: on)")
    r.set_defaults(fn=_run)
    rep = sub.add_parser("report", help="write one self-contained HTML dashboard over runs")
    rep.add_argument("runs", nargs="+", metavar="RUN",
                     help="run directories, or folders of runs (e.g. a `cl sweep` output directory)")
    rep.add_argument("--out", help="HTML file to write (default: RUN/report.html for one path, else ./report.html)")
    rep.add_argument("--title", help="page title")
    rep.set_defaults(fn=_report)
    sw = sub.add_parser("sweep", help="run a grid of configs x seeds, one directory each, then report them")
    sw.add_argument("config", nargs="?", help="base run config YAML, or a sweep file (base/config, grid, seeds, set)")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="values to cross, e.g. --grid strategy.name=simplecil,sema (repeatable)")
    sw.add_argument("--seeds", metavar="S1,S2", help="seeds, e.g. 0,1,2 (each grid point runs once per seed)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value in every run (repeatable)")
    sw.add_argument("--out", help="sweep directory (default runs/sweep-<config name>)")
    sw.add_argument("--logger", help="comma-separated loggers for every run")
    sw.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    sw.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                    help="write OUT/report.html over the sweep's runs (default: on)")
    sw.set_defaults(fn=_sweep)
    ls = sub.add_parser("list", help="list registered strategies, scenarios, backbones, heads, routers, loggers, or "
                                     "one entry's parameters")
    ls.add_argument("kind", nargs="?", help="strategies | scenarios | backbones | heads | routers | loggers")
    ls.add_argument("name", nargs="?", help="an entry of that kind: its parameters with types, defaults and meaning "
                                            "(e.g. cl list strategies sema)")
    ls.add_argument("--pattern", default="*", help="wildcard filter, e.g. 'vit_*'")
    ls.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                    help="import code that registers entries first, e.g. examples/custom_strategy.py (repeatable)")
    ls.set_defaults(fn=_list)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except CLError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as e:
        from cl.interrupt import RunInterrupted

        if isinstance(e, RunInterrupted):  # cl.run printed where it stopped and how to resume
            return 130 if e.signal_name == "SIGINT" else 143
        Console(stderr=True).print("interrupted; the last finished experience is checkpointed (use --resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
