"""Attach adapters to a backbone's linear layers by regex over module paths.

The backbone creates every linear layer through a factory
`make_linear(path, in_features, out_features, *, axes, use_bias, rngs)`.
`make_linear_factory(specs)` returns such a factory: a layer whose path
fully matches the `targets` regex of one or more specs is built as `Adapted`
(the plain layer plus those adapters), every other layer stays plain. So the
backbone never names an expert, and configs alone decide where experts go:

  config.experts = [dict(kind='smola', targets=r'decoder/.*/mlp/(gate|up|down)',
                         pools=dict(text=16, image=16, all=16), rank=4)]
"""
import dataclasses
import re
from typing import Any, Callable

import jax
from flax import nnx

from omnismola.experts.lora import LoRA
from omnismola.experts.smola import SMoLA
from omnismola.models.layers import TokenInfo, make_dense

# kind -> adapter class; each is built as cls(in, out, **options, axes, rngs).
ADAPTER_KINDS: dict[str, Callable[..., nnx.Module]] = {
    "lora": LoRA,
    "smola": SMoLA,
}


class Adapted(nnx.Module):
  """A plain linear layer plus adapters whose outputs are added to it."""

  def __init__(self, base: nnx.Module, adapters: dict[str, nnx.Module]):
    self.base = base
    self.adapters = nnx.Dict(adapters)
    self.path = base.path
    self.in_features = base.in_features
    self.out_features = base.out_features

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    y = self.base(x, tokens)
    for adapter in self.adapters.values():
      y = y + adapter(x, tokens).astype(y.dtype)
    return y


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
               axes, use_bias: bool, rngs: nnx.Rngs) -> nnx.Module:
    base = make_dense(path, in_features, out_features, axes=axes,
                      use_bias=use_bias, rngs=rngs)
    self.built_paths.append(path)
    adapters = {}
    for i, spec in enumerate(self.specs):
      if re.fullmatch(spec.targets, path):
        self.matches[i].append(path)
        try:
          adapters[spec.name(i)] = ADAPTER_KINDS[spec.kind](
              in_features, out_features, axes=axes, rngs=rngs, **spec.options)
        except TypeError as e:
          raise ValueError(f"config.experts[{i}] ({spec.kind}) at {path}: "
                           f"{e}") from e
    return Adapted(base, adapters) if adapters else base

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
