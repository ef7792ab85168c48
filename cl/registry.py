"""Name -> entry-point registries for backbones, scenarios and strategies (timm-style).

Each registry maps a name to a callable. ``create(name, *args, **params)`` validates ``params``
against the callable's signature (via pydantic), so unknown keys and wrong types fail with a
message that lists the valid keys. A class entry that takes ``**kwargs`` also takes its bases' keyword parameters,
with its ``param_defaults`` as their defaults, less the ``hidden_params`` it fixes; a ``check_params(params)``
attribute checks parameters together.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic

from cl.errors import ConfigError


class Registry:
    """A table of named entry points of one kind (``"strategy"``, ``"backbone"``, ...)."""

    def __init__(self, kind: str, n_positional: int = 0, autoload: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.autoload = autoload  # modules whose import registers the built-in entries
        self._loaded = False
        self.n_positional = n_positional  # leading positional args not taken from config
        self._entries: dict[str, Callable[..., Any]] = {}
        self._models: dict[str, type[pydantic.BaseModel]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@REG.register("name")`` adds the function or class under ``name``."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            self._models.pop(key, None)
            return fn

        return deco

    @property
    def plural(self) -> str:
        """The kind's plural, as ``cl list`` names it (``strategies``, ``backbones``)."""
        return self.kind[:-1] + "ies" if self.kind.endswith("y") else self.kind + "s"

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self.autoload:
                importlib.import_module(mod)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        self._load()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> Callable[..., Any]:
        """The entry for ``name``; an unknown name raises ConfigError with a suggestion."""
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint} (available: {', '.join(self.names())})"
            )
        return self._entries[name]

    def describe(self, name: str) -> str:
        """First line of the entry's docstring."""
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def params(self, name: str) -> list[Param]:
        """The entry's parameters as the registry takes them (``params_model``): type, default and a line of
        documentation each, from the docstrings of the entry (and, for a class, its ``__init__`` and its bases)."""
        docs = param_docs(self.get(name))
        return [Param(key, type_text(field.annotation, field.metadata), field.is_required(),
                      None if field.is_required() else field.default, docs.get(key, ""))
                for key, field in self.params_model(name).model_fields.items()]

    def params_model(self, name: str) -> type[pydantic.BaseModel]:
        """A pydantic model of the entry's keyword parameters (extra keys forbidden)."""
        if name not in self._models:
            fn = self.get(name)
            sig = inspect.signature(fn, eval_str=True)
            params = list(sig.parameters.values())
            if inspect.isclass(fn):
                params = params[1:] if params and params[0].name == "self" else params
            fields: dict[str, Any] = {}
            for p in params[self.n_positional :]:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                ann = Any if p.annotation is inspect.Parameter.empty else p.annotation
                default = ... if p.default is inspect.Parameter.empty else p.default
                fields[p.name] = (ann, default)
            if inspect.isclass(fn) and any(p.kind == p.VAR_KEYWORD for p in params):
                fields.update({k: v for k, v in inherited_params(fn).items() if k not in fields})
            for hidden in getattr(fn, "hidden_params", ()):  # parameters the entry fixes: neither shown nor taken
                fields.pop(hidden, None)
            self._models[name] = pydantic.create_model(
                f"{self.kind}_{name}_params",
                # NaN and inf are no setting of any entry: every float parameter must be finite
                __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False),
                **fields,
            )
        return self._models[name]

    def validate(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Checked and completed keyword parameters for ``name`` (defaults filled in).

        Beyond the signature, an entry may check its parameters together with a ``check_params(params)``
        attribute that raises ValueError (e.g. a backbone's image size against its minimum input size)."""
        model = self.params_model(name)
        try:
            checked = model(**params).model_dump()
        except pydantic.ValidationError as e:
            raise ConfigError(format_validation_error(e, f"{self.kind} {name!r}", model)) from None
        check = getattr(self.get(name), "check_params", None)
        if check is not None:
            try:
                check(checked)
            except ValueError as e:
                raise ConfigError(f"bad value for {self.kind} {name!r}: {e}") from None
        return checked

    def create(self, name: str, *args: Any, **params: Any) -> Any:
        """Validate ``params`` and call the entry for ``name``."""
        return self.get(name)(*args, **self.validate(name, params))


@dataclass(frozen=True)
class Param:
    """One parameter of a registry entry: name, type (as text), required or default, one line of documentation."""

    name: str
    type: str
    required: bool
    default: Any
    doc: str


_CONSTRAINTS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >="),
                ("max_length", "length <="))


def type_text(ann: Any, metadata: Any = ()) -> str:
    """A type annotation as a reader writes it: ``int >= 1``, ``'adam' | 'sgd'``, ``list[int] | None``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        text = type_text(args[0], [*args[1:], *metadata])
        metadata = ()
    elif origin is typing.Literal:
        text = " | ".join(repr(a) for a in args)
    elif origin in (typing.Union, types.UnionType):
        text = " | ".join(type_text(a) for a in args)
    elif origin is not None:
        base = getattr(origin, "__name__", str(origin))
        text = f"{base}[{', '.join(type_text(a) for a in args)}]" if args else base
    elif ann is type(None):
        text = "None"
    elif ann is Any:
        text = "any"
    elif isinstance(ann, type):
        text = ann.__name__
    else:
        text = str(ann).replace("typing.", "")
    for m in metadata:
        for attr, sign in _CONSTRAINTS:
            if getattr(m, attr, None) is not None:
                text += f" {sign} {getattr(m, attr)}"
    return text


_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters|Params):\s*$")
_ARG_LINE = re.compile(r"^(\s+)(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")
_NAMES_AT_START = re.compile(r"^((?:``\w+``(?:\s*(?:/|,|and|or)\s*)?)+)")


def _docstrings(entry: Any) -> list[str]:
    """The docstrings that may document an entry's parameters, nearest first: a function's own; a class's and its
    ``__init__``'s, then its bases' (clagent's and the user's, not torch's or the standard library's); last, the
    module docstrings of those (parameters every entry of a module shares are documented there once)."""
    owners = [entry] if not inspect.isclass(entry) else [
        k for k in entry.__mro__ if k.__module__.split(".")[0] not in ("torch", "builtins", "typing", "abc")]
    out = []
    for owner in owners:
        out.append(owner.__doc__ if not inspect.isclass(owner) or "__doc__" in vars(owner) else None)
        init = vars(owner).get("__init__") if inspect.isclass(owner) else None
        out.append(init.__doc__ if init is not None else None)
    for owner in owners:
        out.append(getattr(inspect.getmodule(owner), "__doc__", None))
    return [inspect.cleandoc(d) for d in dict.fromkeys(out) if d]


def _sentence(text: str) -> str:
    """The first sentence of ``text`` (ended by a period or semicolon outside brackets) with whitespace collapsed
    and reST literals (````x````) as ```x```."""
    text = re.sub(r"\s+", " ", text).strip()
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch in ".;" and (i + 1 == len(text) or text[i + 1] == " ") and text[max(0, i - 3):i + 1] \
                not in ("e.g.", "i.e.") and text[max(0, i - 1):i + 1] not in ("g.", "e."):
            text = text[: i + (ch == ".")]
            break
    return re.sub(r"``([^`]+)``", r"`\1`", text).strip()


def param_docs(entry: Any) -> dict[str, str]:
    """One line of documentation per parameter name, from the entry's docstrings (``_docstrings``, nearest first):
    an ``Args:`` section's ``name: text``, else a clause that starts with ````name```` (``name: text`` loses its
    ``name:``)."""
    docs = _docstrings(entry)
    found: dict[str, str] = {}
    for doc in docs:
        for name, text in _args_section(doc).items():
            found.setdefault(name, text)
    for doc in docs:
        for clause in re.split(r"(?<=[.;])\s+|\n\s*\n", doc):
            clause = clause.strip()
            if m := _NAMES_AT_START.match(clause):
                text = clause[m.end():].lstrip()
                text = text[1:] if text.startswith(":") and m.group(1).count("``") == 2 else clause
                for name in re.findall(r"``(\w+)``", m.group(1)):
                    found.setdefault(name, text)
    return {name: _sentence(text) for name, text in found.items() if text.strip()}


def _args_section(doc: str) -> dict[str, str]:
    """``name -> text`` of the entries of a docstring's ``Args:`` section (continuation lines joined)."""
    args: dict[str, str] = {}
    header, indent, current = None, None, None  # the Args: line's indentation, its entries', the entry read
    for line in doc.splitlines():
        depth = len(line) - len(line.lstrip())
        if _ARGS_HEADER.match(line):
            header, indent, current = depth, None, None
        elif header is None or not line.strip():
            current = None
        elif depth <= header:
            header = None
        elif (m := _ARG_LINE.match(line)) and depth == (indent or depth):
            indent, current = depth, m.group(2)
            args[current] = m.group(3)
        elif current is not None and depth > (indent or 0):
            args[current] += " " + line.strip()
    return args


def inherited_params(cls: type) -> dict[str, tuple[Any, Any]]:
    """Keyword parameters a class forwards with ``**kwargs`` to its bases' ``__init__`` (nearest base first),
    as ``{name: (annotation, default)}``; ``param_defaults`` dicts (``param_defaults_of``) override the bases'
    defaults."""
    out: dict[str, tuple[Any, Any]] = {}
    for base in cls.__mro__[1:]:
        if "__init__" not in vars(base) or base is object:
            continue
        sig = inspect.signature(base.__init__, eval_str=True)
        for p in sig.parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty and p.name not in out:
                ann = Any if p.annotation is p.empty else p.annotation
                out[p.name] = (ann, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    defaults = param_defaults_of(cls)
    return {k: (ann, defaults.get(k, d)) for k, (ann, d) in out.items()}


def param_defaults_of(cls: type) -> dict[str, Any]:
    """The ``param_defaults`` of a class and its bases, merged (a class's own win over its bases')."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("param_defaults", {}))
    return out


def _fields_at(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc`` (``("eval",)`` -> EvalConfig's fields)."""
    for key in loc:
        field = model.model_fields.get(str(key))
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, pydantic.BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_validation_error(
    err: pydantic.ValidationError, where: str, model: type[pydantic.BaseModel]
) -> str:
    """One readable line per problem, listing the valid keys when a key is unknown."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            fields = _fields_at(model, e["loc"][:-1])
            valid = ", ".join(fields) or "(none)"
            close = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {loc!r} for {where}{hint} (valid keys: {valid})")
        elif e["type"] == "missing":
            lines.append(f"missing required key {loc!r} for {where}")
        else:
            lines.append(f"bad value for {where} key {loc!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


BACKBONES = Registry("backbone", autoload=("cl.backbones",))
SCENARIOS = Registry("scenario", autoload=("scenarios",))
STRATEGIES = Registry("strategy", n_positional=1, autoload=("strategies",))

register_backbone = BACKBONES.register
register_scenario = SCENARIOS.register
register_strategy = STRATEGIES.register
LOGGERS = Registry("logger", autoload=("cl.callbacks",))
register_logger = LOGGERS.register
HEADS = Registry("head", n_positional=1, autoload=("cl.heads",))
register_head = HEADS.register
ROUTERS = Registry("router", n_positional=1, autoload=("cl.routing",))
