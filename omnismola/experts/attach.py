r"""Attach experts to a backbone by regex over module paths.

The backbone creates every linear layer through a LinearFactory
`make_linear(path, in_features, out_features, *, axes, use_bias, rngs,
match_paths)` and every MLP block through an MlpFactory `make_mlp(path,
width, mlp_dim, *, activation, make_linear, rngs, match_paths, out_features,
causal)` (models/layers.py). `make_factory(config.experts)` returns an
`ExpertFactory` providing both. Each kind is a module of this package
declaring a `KIND` (experts/kind.py; `KINDS` collects them), which says
what it attaches to, linear layers and/or MLP blocks, and how:

* adapters (`lora`, `smola` on linear layers; `sparse_lora` on linear
  layers and MLP blocks) go beside the module: its output is the module's
  plus theirs (`Dense(..., adapters=...)`, `make_mlp(..., adapters=...)`),
  and the module's own parameters keep their paths;
* replacements (`sparse_moe`) replace an MLP block: the block is built as
  that kind, with the block's widths and activation, at the block's path.

A module whose match paths fully match an entry's `targets` gets that
entry. So the backbone never names an expert, and configs alone decide
where experts go:

  config.experts = [
      dict(kind='smola', targets=r'decoder/.*/mlp/(gate|up|down)',
           pools=dict(text=16, image=16, all=16), rank=4),
      dict(kind='sparse_moe', targets=r'vit/layers/\d+/mlp', num_experts=4,
           top_k=2),
      dict(kind='sparse_lora', targets=r'decoder/layers/\d+/mlp',
           num_experts=4, rank=64),
  ]

A module of a scanned stack matches as each of its layers
(`decoder/layers/0/mlp`, ...; see `models/stack.py`). A tower is split into
stacks of consecutive layers that the entries match alike (`experts_at`),
so a regex may pick some layers of a tower; within one stack, whose layers
share one structure, it matches all of them or none.
One factory builds one model: it records what it built (for
`check_all_matched`) and the routers an entry shares inside a block.
"""
import dataclasses
import functools
import importlib
import pkgutil
import re
from typing import Any, Callable

from flax import nnx

from omnismola import experts as experts_package
from omnismola.experts.kind import BLOCK, LINEAR, SORTS, Kind
from omnismola.models import layers
from omnismola.models.layers import Dense



def find_kinds() -> dict[str, Kind]:
  """{name: Kind} of every module of this package that declares a `KIND`."""
  kinds = {}
  for module_info in pkgutil.iter_modules(experts_package.__path__):
    module = importlib.import_module(
        f"{experts_package.__name__}.{module_info.name}")
    kind = getattr(module, "KIND", None)
    if kind is None:
      continue
    if kind.name in kinds:
      raise ValueError(f"Two expert kinds are called {kind.name!r}: "
                       f"{kinds[kind.name].cls} and {kind.cls}.")
    kinds[kind.name] = kind
  return kinds


KINDS: dict[str, Kind] = find_kinds()


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
    if kind not in KINDS:
      raise ValueError(f"config.experts[{index}]: unknown kind {kind!r}; "
                       f"known kinds: {sorted(KINDS)}.")
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
  def sorts(self) -> tuple[str, ...]:
    """What the kind attaches to: LINEAR and/or BLOCK."""
    return KINDS[self.kind].attaches_to


class ExpertFactory:
  """Builds linear layers (`linear`) and MLP blocks (`mlp`) with the experts
  the specs attach, and remembers what it built for `check_all_matched`.

  `instance_features` is the width of `TokenInfo.instance` (the decoder
  width), which instance-routed kinds size their routers by.
  """

  def __init__(self, specs: list[ExpertSpec],
               instance_features: int | None = None):
    self.specs = specs
    self.instance_features = instance_features
    self.built_paths: dict[str, list[str]] = {sort: [] for sort in SORTS}
    self.matches: dict[int, list[str]] = {i: [] for i in range(len(specs))}
    # (spec index, block path) -> the module the spec shares in that block.
    self.shared: dict[tuple[int, str], nnx.Module] = {}

  def _matching(self, sort: str, path: str,
                match_paths: tuple[str, ...] | None) -> list[int]:
    """Indices of the specs attaching to the `sort` module at `path`.

    A spec matches all of `match_paths` (the module in every layer of its
    stack) or none; matching some is an error.
    """
    match_paths = match_paths or (path,)
    self.built_paths[sort].extend(match_paths)
    found = []
    for i, spec in enumerate(self.specs):
      if sort not in spec.sorts:
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

  def experts_at(self, path: str) -> tuple[int, ...]:
    """Indices of the specs whose targets match `path`, whatever sort of
    module is there; builds and records nothing. Towers compare it between
    layers to split into stacks of one structure (models/stack.py)."""
    return tuple(i for i, spec in enumerate(self.specs)
                 if re.fullmatch(spec.targets, path))

  def _build(self, i: int, path: str, cls, *args, **kwargs) -> nnx.Module:
    """cls(*args, **kwargs, **options of spec i); bad options name the spec
    and the module."""
    try:
      return cls(*args, **kwargs, **self.specs[i].options)
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.experts[{i}] ({self.specs[i].kind}) at "
                       f"{path}: {e}") from e

  def _share(self, i: int, block: str, make: Callable[[], nnx.Module]):
    """The module spec i made earlier inside `block`, else `make()` now."""
    if (i, block) not in self.shared:
      self.shared[i, block] = make()
    return self.shared[i, block]

  def _adapters(self, indices: list[int], path: str, in_features: int,
                out_features: int, axes, rngs: nnx.Rngs) -> dict:
    """{name: adapter} of the specs `indices` beside the module at `path`."""
    adapters = {}
    for i in indices:
      kind = KINDS[self.specs[i].kind]
      context = {}
      if kind.routed:
        # A block's layers share by their parent path (`.../mlp`).
        context = dict(instance_features=self.instance_features,
                       share_in_block=functools.partial(
                           self._share, i, path.rpartition("/")[0]))
      adapters[self.specs[i].name(i)] = self._build(
          i, path, kind.cls, in_features, out_features, axes=axes, rngs=rngs,
          **context)
    return adapters

  def linear(self, path: str, in_features: int, out_features: int, *,
             axes, use_bias: bool, rngs: nnx.Rngs,
             match_paths: tuple[str, ...] | None = None) -> Dense:
    """A LinearFactory: a Dense with the adapters whose targets match."""
    adapters = self._adapters(self._matching(LINEAR, path, match_paths),
                              path, in_features, out_features, axes, rngs)
    return Dense(path, in_features, out_features, axes=axes,
                 use_bias=use_bias, rngs=rngs, match_paths=match_paths,
                 adapters=adapters)

  def mlp(self, path: str, width: int, mlp_dim: int, *, activation: str,
          make_linear, rngs: nnx.Rngs,
          match_paths: tuple[str, ...] | None = None,
          out_features: int | None = None, causal: bool = False):
    """An MlpFactory: the replacing kind whose targets match, else the
    dense MLP with the matching adapters beside it.

    A replacement keeps the block's path, so its parameters live where the
    dense block's did (`decoder/layers/mlp/router`,
    `decoder/layers/mlp/layers/up/kernel`, ...); adapters live at
    `<block path>/adapters/<kind>_<i>`.
    """
    found = self._matching(BLOCK, path, match_paths)
    replacing = [i for i in found if KINDS[self.specs[i].kind].replaces]
    beside = [i for i in found if i not in replacing]
    if len(replacing) > 1:
      raise ValueError(f"config.experts{replacing} all replace the MLP block "
                       f"{path}; a block can be replaced once.")
    if replacing and beside:
      raise ValueError(
          f"config.experts{beside} add adapters beside the MLP block {path}, "
          f"which config.experts[{replacing[0]}] "
          f"({self.specs[replacing[0]].kind}) replaces; adapters go beside "
          "dense blocks only.")
    if replacing:
      i = replacing[0]
      return self._build(i, path, KINDS[self.specs[i].kind].cls, path, width,
                         mlp_dim, activation=activation,
                         out_features=out_features, causal=causal, rngs=rngs)
    # A block maps model width to model width (the connector's to the
    # decoder's): `embed` on both sides, as the connector's projection.
    adapters = self._adapters(beside, path, width, out_features or width,
                              ("embed", "embed"), rngs)
    return layers.make_mlp(path, width, mlp_dim, activation=activation,
                           make_linear=make_linear, rngs=rngs,
                           out_features=out_features, adapters=adapters)

  def check_all_matched(self) -> None:
    """Fails when a spec attached to nothing: usually a typo in `targets`."""
    for i, paths in self.matches.items():
      if not paths:
        spec = self.specs[i]
        raise ValueError(
            f"config.experts[{i}] ({spec.kind}): targets {spec.targets!r} "
            f"matched no {' or '.join(spec.sorts)}. " + " ".join(
                f"The model's {sort}s are:\n  " +
                "\n  ".join(self.built_paths[sort]) + "\n"
                for sort in spec.sorts))


def make_factory(expert_entries, *,
                 instance_features: int | None = None) -> ExpertFactory:
  """A factory attaching the experts that `config.experts` lists.

  `instance_features`: the width of `TokenInfo.instance`, the decoder width
  (`build.build_model` gives it); only instance-routed experts need it.
  """
  specs = [ExpertSpec.parse(i, e) for i, e in enumerate(expert_entries or ())]
  return ExpertFactory(specs, instance_features)
