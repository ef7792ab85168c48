"""Run configuration: YAML plus ``--set key=value`` overrides, validated with pydantic.

A component (scenario, backbone, strategy) is ``{name: ..., <params>}``; its params are checked
against the registered entry's signature, and ``resolve`` fills in every default, so the
``config.yaml`` written into a run directory is enough to repeat the run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml

from cl.errors import ConfigError
from cl.memory.config import MemoryConfig
from cl.plugins import import_plugins
from cl.registry import BACKBONES, SCENARIOS, STRATEGIES, Registry, format_validation_error

#: a random seed: what numpy's generators take (a scenario's seed may also be None where its docstring says so)
Seed = Annotated[int, pydantic.Field(ge=0, le=2**32 - 1)]


class Component(pydantic.BaseModel):
    """A registry name plus its keyword parameters."""

    model_config = pydantic.ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvalConfig(pydantic.BaseModel):
    """Evaluation settings."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    batch_size: int = pydantic.Field(256, ge=1)
    future: bool = False  # also evaluate experiences not yet learned (for forward transfer)


def _doc(text: str) -> Any:
    return pydantic.Field(description=text)


class RunConfig(pydantic.BaseModel):
    """Everything a run needs; ``cl run CONFIG`` reads this from YAML (``cl run --help`` lists the keys)."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/inf are never a setting
    seed: Annotated[Seed, _doc("run seed: weights, shuffling and, unless scenario.seed is set, the class order")] = 0
    device: Annotated[str, _doc("auto, cpu, cuda or cuda:N")] = "auto"
    out: Annotated[str | None, _doc("run directory (default runs/<scenario>-<strategy>-<backbone>-seed<N>)")] = None
    threads: Annotated[int | None, pydantic.Field(ge=1), _doc("CPU threads torch uses (null: torch's default)")] \
        = None
    deterministic: Annotated[bool, _doc("deterministic algorithms, so a rerun is bit-identical")] = True
    progress: Annotated[bool, _doc("progress bars (on a terminal)")] = True
    cache_max_gb: Annotated[float, pydantic.Field(ge=0), _doc("memory for cached outputs of frozen blocks")] = 8.0
    checkpoint_interval_s: Annotated[float | None, pydantic.Field(gt=0), _doc(
        "a resume point inside an experience at most this often, in seconds of training (null: only after each "
        "experience and on SIGINT/SIGTERM)")] = 600.0
    loggers: Annotated[list[str], _doc("console, csv, tensorboard, wandb, report")] = ["console"]
    imports: Annotated[list[str], _doc("modules or .py files that register strategies, scenarios or backbones, "
                                       "imported first (--import)")] = []
    scenario: Annotated[Component, _doc("the stream: {name, params} (cl list scenarios NAME)")] = \
        Component(name="split_fmnist")
    backbone: Annotated[Component, _doc("the pretrained model: {name, params} (cl list backbones NAME)")] = \
        Component(name="efficientnet_lite0")
    strategy: Annotated[Component, _doc("the method: {name, params} (cl list strategies NAME)")] = \
        Component(name="simplecil")
    eval: Annotated[EvalConfig, _doc("evaluation: batch_size, future (also test experiences not learned yet)")] = \
        EvalConfig()
    memory: Annotated[MemoryConfig, _doc("the experience memory: index, metric, budget, path (docs/memory.md)")] = \
        MemoryConfig()

    @pydantic.field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError("not a device: use auto, cpu, cuda or cuda:N") from None
        return value


_COMPONENTS: dict[str, Registry] = {"scenario": SCENARIOS, "backbone": BACKBONES, "strategy": STRATEGIES}


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar/list/dict syntax (``3``, ``0.1``, ``true``, ``[0, 1]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. strategy.lr=0.01)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = parse_value(text)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; malformed YAML or a missing file raise ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML file (e.g. {path / 'config.yaml'})")
    try:
        with path.open(encoding="utf-8") as f:  # a stream, so YAML errors name the file
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {path}: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read config file {path} as YAML text ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def build_config(
    data: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    components: dict[str, str | None] | None = None,
    **top: Any,
) -> RunConfig:
    """Merge a config dict, component names (``--strategy``...), top-level values and overrides.

    Naming a different component resets its params (they belong to the old one).
    """
    data = copy.deepcopy(data or {})
    for key, name in (components or {}).items():
        if name is None:
            continue
        cur = data.get(key)
        if not isinstance(cur, dict) or cur.get("name") != name:
            data[key] = {"name": name}
    for key, value in top.items():
        if value is not None:
            data[key] = value
    for item in overrides or []:
        apply_override(data, item)
    for key in _COMPONENTS:
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
        elif isinstance(data.get(key), dict) and "name" not in data[key]:  # --set strategy.lr=... tunes the default
            data[key] = {"name": RunConfig.model_fields[key].default.name, **data[key]}
    try:
        return RunConfig(**data)
    except pydantic.ValidationError as e:
        raise ConfigError(format_validation_error(e, "the run config", RunConfig)) from None


def resolve(cfg: RunConfig) -> RunConfig:
    """Validate each component's params against its registry entry and fill in defaults; a scenario's
    ``seed`` (its class order) defaults to the run seed, so a list of seeds is a list of class orders."""
    import_plugins(cfg.imports)
    out = cfg.model_copy(deep=True)
    for key, reg in _COMPONENTS.items():
        comp: Component = getattr(cfg, key)
        params = reg.validate(comp.name, comp.params)
        if key == "scenario" and "seed" in params and "seed" not in comp.params:
            params["seed"] = cfg.seed  # unless set, the class order follows the run seed (seeds = orders)
        setattr(out, key, Component(name=comp.name, **params))
    return out


def _flow(value: Any) -> str:
    """A value as YAML writes it on one line (``null``, ``true``, ``[console]``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def keys_help() -> str:
    """The top-level keys of a run config, with their defaults and meaning (``cl run --help``)."""
    lines = ["config keys (YAML, or --set KEY=VALUE; KEY.SUB for a section's keys):"]
    for key, field in RunConfig.model_fields.items():
        default = field.default
        if isinstance(default, Component):
            shown = f"name: {default.name}"
        elif isinstance(default, pydantic.BaseModel):
            shown = ", ".join(f"{k}: {_flow(v)}" for k, v in default.model_dump().items())
        else:
            shown = _flow(default)
        lines.append(f"  {key} ({shown}): {field.description}")
    return "\n".join(lines)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain data, components flattened (``{name, **params}``)."""
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
