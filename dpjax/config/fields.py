"""Typed config fields: the `Spec` base of every config block, and name registries.

A block is a frozen dataclass whose fields each carry a type, a default and a one-line meaning
(`field(default, help, choices=...)`). Constructing a spec checks every field's type (an int is
accepted where a float is expected and becomes a float) and its choices, then runs the block's own
value checks (`check`). `from_mapping` builds a spec from a config block (a dict), refusing keys
the block does not have; `defaults` gives the block's default dict (what `default_config` holds)
and `describe` its keys with defaults and meanings (what `--help` lists).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Generic, Self, TypeVar

from ml_collections import config_dict

T = TypeVar("T")


class ConfigError(ValueError):
  """A config that cannot run: an unknown key, a value of the wrong type, or a bad value."""


def field(default: Any, help: str, choices: Iterable[str] | None = None) -> Any:  # noqa: A002
  """A spec field with its default, its meaning (one line) and, for names, the accepted ones."""
  metadata = {"help": help, "choices": choices}
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
  if dataclasses.is_dataclass(default):
    return dataclasses.field(default_factory=lambda: default, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def alternatives(names: Iterable[str]) -> str:
  """'a' | 'a' or 'b' | 'a', 'b' or 'c'."""
  quoted = [repr(n) for n in names]
  return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition`."""
  if not condition:
    raise ConfigError(message)


INTERVAL = "an interval of 0 divides by zero"  # why intervals in steps must be > 0


def check_positive_int(path: str, value: int, why: str = "") -> None:
  check(value > 0, f"{path} must be an integer > 0, got {value!r}{f' ({why})' if why else ''}.")


def check_at_least(path: str, value: float, low: float, meaning: str = "") -> None:
  check(math.isfinite(value) and value >= low,
        f"{path} must be >= {low}{meaning}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Registry(Generic[T]):
  """Names a config key accepts, each with what it builds. `lookup` refuses an unknown name with
  the list of known ones."""
  key: str
  entries: Mapping[str, T]

  def names(self) -> tuple[str, ...]:
    return tuple(self.entries)

  def __iter__(self):
    return iter(self.entries)

  def __contains__(self, name: object) -> bool:
    return name in self.entries

  def lookup(self, name: str) -> T:
    if name not in self.entries:
      raise ConfigError(f"Unknown {self.key} {name!r}; choose {alternatives(self.names())}.")
    return self.entries[name]


@dataclasses.dataclass(frozen=True)
class Spec:
  """Base of a config block. BLOCK: the block's path in the config ("dp", "finetune.sparse")."""
  BLOCK: ClassVar[str] = ""

  def __post_init__(self):
    hints = _hints(type(self))
    for f in dataclasses.fields(self):
      path = self.path(f.name)
      value = _typed(path, hints[f.name], getattr(self, f.name))
      object.__setattr__(self, f.name, value)
      choices = f.metadata.get("choices")
      if choices is not None and value not in choices:
        raise ConfigError(f"{path} must be {alternatives(choices)}, got {value!r} "
                          f"({f.metadata['help']}).")
    self.check()

  def check(self) -> None:
    """The block's value checks (ConfigError with what to do); none by default."""

  @classmethod
  def path(cls, name: str) -> str:
    return f"{cls.BLOCK}.{name}" if cls.BLOCK else name

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> Self:
    """The spec of a config block; missing keys take their defaults, unknown keys are refused."""
    check(isinstance(values, Mapping),
          f"{cls.BLOCK or 'The config'} must be a block of keys (a dict), got {values!r}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    check(not unknown, f"Unknown config key {cls.path(unknown[0]) if unknown else ''}; "
                       f"{cls.BLOCK or 'the config'} has {', '.join(known)}.")
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
      spec = _spec_type(hints[name])
      kwargs[name] = (spec.from_mapping(value) if spec is not None and isinstance(value, Mapping)
                      else value)
    return cls(**kwargs)

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """The block's default config dict: nested blocks as dicts, an unset number as a placeholder
    of its type (so that --config.dp.noise_multiplier=1 parses), an absent block left out."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
      default = _default(f)
      spec = _spec_type(hints[f.name])
      if spec is not None:
        if default is not None:
          out[f.name] = spec.defaults()
      elif default is None:
        out[f.name] = config_dict.placeholder(_inner(hints[f.name]))
      else:
        out[f.name] = default
    return out

  @classmethod
  def describe(cls) -> list[tuple[str, Any, str]]:
    """(key, default, meaning) for every key of the block, nested blocks included."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
      spec = _spec_type(hints[f.name])
      if spec is not None:
        rows += spec.describe()
        continue
      meaning = f.metadata["help"]
      if f.metadata.get("choices") is not None:
        meaning += f"; one of {', '.join(f.metadata['choices'])}"
      rows.append((cls.path(f.name), _default(f), meaning))
    return rows

  @classmethod
  def block_type(cls, name: str) -> type[Spec] | None:
    """The spec type of the nested block `name` (None if `name` is not a nested block)."""
    hint = _hints(cls).get(name)
    return None if hint is None else _spec_type(hint)

  def changed(self) -> dict[str, Any]:
    """The fields whose values differ from their defaults."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) != _default(f)}


def refuse_unread(path: str, chosen: str, values: Mapping[str, Any], defaults: Mapping[str, Any],
                  readers: Mapping[str, Iterable[str]]) -> None:
  """Refuses a key of `values` that the chosen entry (named by `path` = `chosen`) does not read
  but that differs from its default: it would be silently ignored. readers: key -> names that
  read it."""
  for key, value in values.items():
    names = tuple(readers.get(key, ()))
    if names and chosen not in names and value != defaults[key]:
      block = path.rsplit(".", 1)[0]
      raise ConfigError(
          f"{block}.{key} = {value!r} is read only when {path} is {alternatives(names)}, but "
          f"{path} = {chosen!r} ignores it. Leave {block}.{key} at its default "
          f"({defaults[key]!r}) or set {path} to {alternatives(names)}.")


def _default(f: dataclasses.Field) -> Any:
  return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _inner(hint: Any) -> Any:
  """X for `X | None`, else the hint itself."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0]
  return hint


def _spec_type(hint: Any) -> type[Spec] | None:
  inner = _inner(hint)
  return inner if isinstance(inner, type) and issubclass(inner, Spec) else None


# type -> (what it is called in messages, whether a value is one; an int is a float too).
_TYPES = {bool: ("True or False", lambda v: isinstance(v, bool)),
          int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number (int or float)",
                  lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str))}


def _typed(path: str, hint: Any, value: Any) -> Any:
  """`value` checked against `hint` (an int where a float is expected becomes a float)."""
  inner = _inner(hint)
  if value is None and inner is not hint:
    return None
  if inner in _TYPES:
    name, is_one = _TYPES[inner]
    if not is_one(value):
      unset = " or unset (None)" if inner is not hint else ""
      raise ConfigError(f"{path} must be {name}{unset}, got {value!r} ({type(value).__name__}).")
    return float(value) if inner is float else value
  if isinstance(inner, type) and not isinstance(value, inner):
    raise ConfigError(f"{path} must be a {inner.__name__}, got {value!r}.")
  return value
