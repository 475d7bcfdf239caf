r"""Attach experts to a backbone by regex over module paths.

The backbone creates every linear layer through a LinearFactory
`make_linear(path, in_features, out_features, *, axes, use_bias, rngs,
match_paths)` and every MLP block through an MlpFactory `make_mlp(path,
width, mlp_dim, *, activation, make_linear, rngs, match_paths, out_features,
causal)` (models/layers.py). `make_factory(config.experts)` returns an
`ExpertFactory` providing both:

* adapter kinds (`lora`, `smola`) wrap linear layers: a layer whose match
  paths fully match an entry's `targets` gets that adapter, whose output is
  added to the layer's (`Dense(..., adapters=...)`);
* MLP kinds (`sparse_moe`) replace MLP blocks: a block whose match paths
  match gets built as that kind, with the block's widths and activation,
  instead of the dense MLP.

So the backbone never names an expert, and configs alone decide where
experts go:

  config.experts = [
      dict(kind='smola', targets=r'decoder/.*/mlp/(gate|up|down)',
           pools=dict(text=16, image=16, all=16), rank=4),
      dict(kind='sparse_moe', targets=r'vit/layers/\d+/mlp', num_experts=4,
           top_k=2),
  ]

A module of a scanned stack matches as each of its layers
(`decoder/layers/0/mlp`, ...; see `models/stack.py`); a regex must match
all layers of a stack or none, since the layers share one structure.
"""
import dataclasses
import re
from typing import Any, Callable

from flax import nnx

from omnismola.experts.lora import LoRA
from omnismola.experts.smola import SMoLA
from omnismola.experts.sparse import SparseMoE
from omnismola.models import layers
from omnismola.models.layers import Dense

# kind -> adapter class added to a linear layer; built as
# cls(in, out, **options, axes, rngs).
ADAPTER_KINDS: dict[str, Callable[..., nnx.Module]] = {
    "lora": LoRA,
    "smola": SMoLA,
}
# kind -> class replacing an MLP block; built as cls(path, width, mlp_dim,
# **options, activation, out_features, causal, rngs).
MLP_KINDS: dict[str, Callable[..., nnx.Module]] = {
    "sparse_moe": SparseMoE,
}
# What each group of kinds attaches to, as error messages name it.
_TARGETS = {"linear layer": ADAPTER_KINDS, "MLP block": MLP_KINDS}


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
    if kind not in ADAPTER_KINDS and kind not in MLP_KINDS:
      raise ValueError(f"config.experts[{index}]: unknown kind {kind!r}; "
                       f"known kinds: {sorted({**ADAPTER_KINDS, **MLP_KINDS})}.")
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

  @property
  def target(self) -> str:
    """What the kind attaches to: "linear layer" or "MLP block"."""
    return next(t for t, kinds in _TARGETS.items() if self.kind in kinds)


class ExpertFactory:
  """Builds linear layers (`linear`) and MLP blocks (`mlp`) with the experts
  the specs attach, and remembers what it built for `check_all_matched`."""

  def __init__(self, specs: list[ExpertSpec]):
    self.specs = specs
    self.built_paths: dict[str, list[str]] = {t: [] for t in _TARGETS}
    self.matches: dict[int, list[str]] = {i: [] for i in range(len(specs))}

  def _matching(self, target: str, path: str,
                match_paths: tuple[str, ...] | None) -> list[int]:
    """Indices of the specs attaching to the `target` module at `path`.

    A spec matches all of `match_paths` (the module in every layer of its
    stack) or none; matching some is an error.
    """
    match_paths = match_paths or (path,)
    self.built_paths[target].extend(match_paths)
    found = []
    for i, spec in enumerate(self.specs):
      if spec.target != target:
        continue
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
      found.append(i)
    return found

  def _build(self, i: int, path: str, cls, *args, **kwargs) -> nnx.Module:
    """cls(*args, **kwargs, **options of spec i); bad options name the spec
    and the module."""
    try:
      return cls(*args, **kwargs, **self.specs[i].options)
    except TypeError as e:
      raise ValueError(f"config.experts[{i}] ({self.specs[i].kind}) at "
                       f"{path}: {e}") from e

  def linear(self, path: str, in_features: int, out_features: int, *,
             axes, use_bias: bool, rngs: nnx.Rngs,
             match_paths: tuple[str, ...] | None = None) -> Dense:
    """A LinearFactory: a Dense with the adapters whose targets match."""
    adapters = {
        self.specs[i].name(i): self._build(
            i, path, ADAPTER_KINDS[self.specs[i].kind], in_features,
            out_features, axes=axes, rngs=rngs)
        for i in self._matching("linear layer", path, match_paths)}
    return Dense(path, in_features, out_features, axes=axes,
                 use_bias=use_bias, rngs=rngs, match_paths=match_paths,
                 adapters=adapters)

  def mlp(self, path: str, width: int, mlp_dim: int, *, activation: str,
          make_linear, rngs: nnx.Rngs,
          match_paths: tuple[str, ...] | None = None,
          out_features: int | None = None, causal: bool = False):
    """An MlpFactory: the MLP kind whose targets match, else the dense MLP.

    The replacement keeps the block's path, so its parameters live where the
    dense block's did (`decoder/layers/mlp/router`,
    `decoder/layers/mlp/layers/up/kernel`, ...).
    """
    found = self._matching("MLP block", path, match_paths)
    if not found:
      return layers.make_mlp(path, width, mlp_dim, activation=activation,
                             make_linear=make_linear, rngs=rngs,
                             out_features=out_features)
    if len(found) > 1:
      raise ValueError(f"config.experts{found} all replace the MLP block "
                       f"{path}; a block can be replaced once.")
    i = found[0]
    return self._build(i, path, MLP_KINDS[self.specs[i].kind], path, width,
                       mlp_dim, activation=activation,
                       out_features=out_features, causal=causal, rngs=rngs)

  def check_all_matched(self) -> None:
    """Fails when a spec attached to nothing: usually a typo in `targets`."""
    for i, paths in self.matches.items():
      if not paths:
        spec = self.specs[i]
        raise ValueError(
            f"config.experts[{i}] ({spec.kind}): targets {spec.targets!r} "
            f"matched no {spec.target}. The model's {spec.target}s are:\n  "
            + "\n  ".join(self.built_paths[spec.target]))


def make_factory(expert_entries) -> ExpertFactory:
  """A factory attaching the experts that `config.experts` lists."""
  specs = [ExpertSpec.parse(i, e) for i, e in enumerate(expert_entries or ())]
  return ExpertFactory(specs)
