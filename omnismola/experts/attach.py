"""Attach adapters to a backbone's linear layers by regex over module paths.

The backbone creates every linear layer through a factory
`make_linear(path, in_features, out_features, *, axes, use_bias, rngs,
match_paths)`. `make_linear_factory(specs)` returns such a factory: a layer
whose match paths fully match the `targets` regex of one or more specs gets
those adapters (`Dense(..., adapters=...)`), every other layer stays plain.
So the backbone never names an expert, and configs alone decide where
experts go:

  config.experts = [dict(kind='smola', targets=r'decoder/.*/mlp/(gate|up|down)',
                         pools=dict(text=16, image=16, all=16), rank=4)]

A layer of a scanned stack matches as each of its layers
(`decoder/layers/0/mlp/up`, ...; see `models/stack.py`); a regex must match
all layers of a stack or none, since the layers share one structure.
"""
import dataclasses
import re
from typing import Any, Callable

from flax import nnx

from omnismola.experts.lora import LoRA
from omnismola.experts.smola import SMoLA
from omnismola.models.layers import Dense

# kind -> adapter class; each is built as cls(in, out, **options, axes, rngs).
ADAPTER_KINDS: dict[str, Callable[..., nnx.Module]] = {
    "lora": LoRA,
    "smola": SMoLA,
}


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """One entry of `config.experts`, validated."""
  kind: str
  targets: str
  options: dict[str, Any]

  @classmethod
  def parse(cls, index: int, entry) -> "ExpertSpec":
    entry = dict(entry)
    kind = entry.pop("kind", None)
    targets = entry.pop("targets", None)
    if kind not in ADAPTER_KINDS:
      raise ValueError(f"config.experts[{index}]: unknown kind {kind!r}; "
                       f"known kinds: {sorted(ADAPTER_KINDS)}.")
    if not isinstance(targets, str):
      raise ValueError(f"config.experts[{index}] ({kind}): `targets` must be "
                       "a regex over module paths, e.g. "
                       r"'decoder/.*/attn/(q|v)'.")
    try:
      re.compile(targets)
    except re.error as e:
      raise ValueError(f"config.experts[{index}] ({kind}): bad targets regex "
                       f"{targets!r}: {e}") from e
    return cls(kind=kind, targets=targets, options=entry)

  def name(self, index: int) -> str:
    return f"{self.kind}_{index}"


class LinearFactory:
  """Builds plain or adapted linear layers and remembers what it built."""

  def __init__(self, specs: list[ExpertSpec]):
    self.specs = specs
    self.built_paths: list[str] = []
    self.matches: dict[int, list[str]] = {i: [] for i in range(len(specs))}

  def __call__(self, path: str, in_features: int, out_features: int, *,
               axes, use_bias: bool, rngs: nnx.Rngs,
               match_paths: tuple[str, ...] | None = None) -> Dense:
    match_paths = match_paths or (path,)
    self.built_paths.extend(match_paths)
    adapters = {}
    for i, spec in enumerate(self.specs):
      matched = [p for p in match_paths if re.fullmatch(spec.targets, p)]
      if not matched:
        continue
      if len(matched) < len(match_paths):
        raise ValueError(
            f"config.experts[{i}] ({spec.kind}): targets {spec.targets!r} "
            f"matches {matched} but not {sorted(set(match_paths) - set(matched))}"
            f". These are layers of one scanned stack ({path}), which share "
            "one structure: match all of them or none.")
      self.matches[i].extend(matched)
      try:
        adapters[spec.name(i)] = ADAPTER_KINDS[spec.kind](
            in_features, out_features, axes=axes, rngs=rngs, **spec.options)
      except TypeError as e:
        raise ValueError(f"config.experts[{i}] ({spec.kind}) at {path}: "
                         f"{e}") from e
    return Dense(path, in_features, out_features, axes=axes,
                 use_bias=use_bias, rngs=rngs, match_paths=match_paths,
                 adapters=adapters)

  def check_all_matched(self) -> None:
    """Fails when a spec attached to nothing: usually a typo in `targets`."""
    for i, paths in self.matches.items():
      if not paths:
        spec = self.specs[i]
        raise ValueError(
            f"config.experts[{i}] ({spec.kind}): targets {spec.targets!r} "
            "matched no linear layer. Linear layers are:\n  " +
            "\n  ".join(self.built_paths))


def make_linear_factory(expert_entries) -> LinearFactory:
  """A factory attaching the adapters that `config.experts` lists."""
  specs = [ExpertSpec.parse(i, e) for i, e in enumerate(expert_entries or ())]
  return LinearFactory(specs)
