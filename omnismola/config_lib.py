"""Loading config files and checking command-line overrides against them.

Configs are Python files with `get_config(arg=None)` returning a locked
ml_collections.ConfigDict (big_vision style); `--config=FILE:ARG` passes ARG.
A misspelt `--config.x.y=...` fails at once naming the bad key and the valid
ones, not with a stack trace from deep in a flag parser.
"""
import importlib.util
import os
import re

import ml_collections


class ConfigKeyError(ValueError):
  """An override names a field the config does not have."""


def load_config_file(spec: str):
  """Runs `get_config(arg)` of FILE for a spec 'FILE' or 'FILE:ARG'."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location("_omnismola_config",
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_sibling_config(config_file: str, name: str, arg: str):
  """The unlocked config of `name:arg`, a config file beside `config_file`
  (papers' configs start from `mix.py` and change what differs)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  return load_config_file(f"{path}:{arg}").unlock()


def check_stage(config_file: str, stage: str, stages) -> None:
  """Fails naming the known stages when `stage` is not one of them."""
  if stage not in stages:
    raise ValueError(f"configs/{os.path.basename(config_file)}: unknown "
                     f"stage {stage!r}; stages: {sorted(stages)}.")


_OVERRIDE = re.compile(r"^--?config\.([^=\s]+)")
# One step of an override's path: a field name, then any list indices
# (ml_collections' syntax: `experts[0].capacity_factor`).
_STEP = re.compile(r"^(\w+)((?:\[-?\d+\])*)$")


def check_override_keys(config, argv) -> None:
  """Raises ConfigKeyError for the first override naming a missing field
  or indexing a list out of range (or a field that is no list)."""
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    node, seen = config, "config"
    for step in match.group(1).split("."):
      if not callable(getattr(node, "keys", None)):
        if isinstance(node, (list, tuple)) and step.isdigit():
          raise ConfigKeyError(
              f"{arg!r}: {seen} is a list; index it as {seen}[{step}] "
              f"(quote the argument in a shell: '--{seen}[{step}]...').")
        break  # Below a leaf value (e.g. into a dict): let the parser decide.
      parts = _STEP.match(step)
      name, indices = parts.groups() if parts else (step, "")
      if name not in node.keys():
        raise ConfigKeyError(
            f"Unknown config key in {arg!r}: {seen} has no field {name!r}. "
            f"Valid fields of {seen}: {', '.join(sorted(node.keys()))}.")
      node, seen = node[name], f"{seen}.{name}"
      for index in re.findall(r"-?\d+", indices):
        if not isinstance(node, (list, tuple)):
          raise ConfigKeyError(f"{arg!r}: {seen} is not a list.")
        if not -len(node) <= int(index) < len(node):
          raise ConfigKeyError(f"{arg!r}: {seen} has {len(node)} entries; "
                               f"[{index}] is out of range.")
        node, seen = node[int(index)], f"{seen}[{index}]"


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=x' of --config=FILE:ARG into fields with `defaults`,
  each of its default's type (bools: true/false/1/0/yes/no)."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigKeyError(f"Unknown config argument {key!r}; known: "
                           f"{', '.join(sorted(defaults))}.")
    if not sep:
      raise ValueError(f"Config argument {item!r} needs a value: {key}=...")
    values[key] = _typed(raw.strip(), defaults[key], key)
  return ml_collections.ConfigDict(values)


def _typed(raw: str, default, key: str):
  if isinstance(default, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"Config argument {key}={raw!r} is not a bool.")
  if isinstance(default, (int, float)):
    return type(default)(raw)
  return raw
