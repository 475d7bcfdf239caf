"""Attach experts to a backbone by regex over module paths.

`make_plan(config.experts, abstract_model)` walks the module graph of the
model built without experts (`nnx.eval_shape`), names each linear layer
(`Dense`) and MLP block (`MlpBlock`) by its path (a module of a scanned
stack once per layer: `decoder/layers/0/mlp`, ...), matches the entries'
`targets` against those names and returns a `stack.Plan`: how each tower
splits into stacks of consecutive layers that get the same experts, and an
`attach` function that adds the experts to a module as the model is built
(`VLM(config, plan=plan, ...)`). Adapters go beside the module, their
output added to its own; replacements (`sparse_moe`) take an MLP block's
place, widths and path. Each kind is a module of this package declaring a
`KIND` (experts/kind.py). Every entry must match something: a typo in
`targets` is an error listing the model's module names. docs/experts.md
and docs/architecture.md say more.
"""
import dataclasses
import functools
import importlib
import pkgutil
import re
from typing import Any

from flax import nnx

from omnismola import experts as experts_package
from omnismola.experts.kind import BLOCK, LINEAR, Kind
from omnismola.models import stack
from omnismola.models.layers import Dense, MlpBlock


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

  def attaches(self, sort: str, name: str) -> bool:
    return sort in KINDS[self.kind].attaches_to and bool(
        re.fullmatch(self.targets, name))


@dataclasses.dataclass(frozen=True)
class Site:
  """A module experts may attach to, in the model built without experts.

  Attributes:
    path: where its parameters live (`decoder/layers/mlp`).
    sort: LINEAR or BLOCK.
    names: what `targets` match: `path` itself, or for a module of a
      stack, one name per layer (`decoder/layers/0/mlp`, ...).
    tower: the path of its stack (`decoder/layers`), or None.
  """
  path: str
  sort: str
  names: tuple[str, ...]
  tower: str | None


def find_sites(model: nnx.Module) -> list[Site]:
  """The linear layers and MLP blocks of `model` (built without experts;
  every tower one stack), in the module graph's order."""
  modules = {"/".join(map(str, path)): module
             for path, module in nnx.iter_modules(model)}
  spans = {path: module.layer_span for path, module in modules.items()
           if hasattr(module, "layer_span")}
  sites = []
  for path, module in modules.items():
    sort = (LINEAR if isinstance(module, Dense) else
            BLOCK if isinstance(module, MlpBlock) else None)
    if sort is None:
      continue
    tower = next((t for t in spans if path.startswith(t + "/")), None)
    names = (path,) if tower is None else tuple(
        f"{tower}/{i}{path[len(tower):]}" for i in range(*spans[tower]))
    sites.append(Site(path, sort, names, tower))
  return sites


class _ExpertPlan:
  """`stack.Plan.attach` for `make_plan`: which entries each module gets.

  `experts` maps a module's path in the built model (a stacked module's
  under its segment, `decoder/layers_0_4/mlp`) to the indices of the specs
  attaching to it.
  """

  def __init__(self, specs: list[ExpertSpec], experts: dict[str, tuple],
               towers: dict[str, tuple[stack.Segment, ...]],
               instance_features: int | None):
    self.specs = specs
    self.experts = experts
    self.segment_paths = [segment.path for segments in towers.values()
                          for segment in segments]
    self.instance_features = instance_features

  def _segment_of(self, path: str) -> str | None:
    return next((s for s in self.segment_paths
                 if path == s or path.startswith(s + "/")), None)

  def _build(self, i: int, path: str, cls, *args, **kwargs) -> nnx.Module:
    """cls(*args, **kwargs, **options of spec i); bad options name the spec
    and the module."""
    try:
      return cls(*args, **kwargs, **self.specs[i].options)
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.experts[{i}] ({self.specs[i].kind}) at "
                       f"{path}: {e}") from e

  def attach(self, module: nnx.Module, path: str, rngs: nnx.Rngs) -> None:
    """Adds the planned experts to `module` (at `path`) and its children;
    those inside another stack than `module`'s get theirs when that stack
    is created."""
    segment = self._segment_of(path)
    # An entry's router shared by the layers of one block (sparse_lora's
    # share_gate): (entry index, block path) -> module.
    shared: dict[tuple[int, str], nnx.Module] = {}
    children = list(nnx.iter_modules(module))  # Before any replacement.
    parents = {"/".join(map(str, p)): m for p, m in children}
    for relative, child in children:
      child_path = "/".join((path, *map(str, relative))).strip("/")
      indices = self.experts.get(child_path)
      if not indices or self._segment_of(child_path) != segment:
        continue
      kinds = [KINDS[self.specs[i].kind] for i in indices]
      if kinds[0].replaces:  # Then the block's only entry (see `_check`).
        parent, _, name = "/".join(map(str, relative)).rpartition("/")
        setattr(parents[parent], name, self._build(
            indices[0], child_path, kinds[0].cls, child.in_features,
            child.mlp_dim, activation=child.activation,
            out_features=child.out_features, causal=child.causal, rngs=rngs))
        continue
      # A block maps model width to model width (the connector's to the
      # decoder's): `embed` on both sides, as the connector's projection.
      axes = child.axes if isinstance(child, Dense) else ("embed", "embed")
      adapters = {}
      for i, kind in zip(indices, kinds):
        context = {}
        if kind.routed:
          context = dict(instance_features=self.instance_features,
                         share_in_block=functools.partial(
                             _share, shared, (i, child_path.rpartition("/")[0])))
        adapters[f"{kind.name}_{i}"] = self._build(
            i, child_path, kind.cls, child.in_features, child.out_features,
            axes=axes, rngs=rngs, **context)
      child.adapters = nnx.Dict(adapters)


def _share(shared: dict, key, make):
  """The module made for `key` earlier, else `make()` now."""
  if key not in shared:
    shared[key] = make()
  return shared[key]


def _check(specs: list[ExpertSpec], sites: list[Site],
           matches: dict[int, list[str]]) -> None:
  """Fails on an entry that matched nothing (usually a typo in `targets`),
  and on blocks experts both replace and sit beside or inside."""
  for i, names in matches.items():
    if not names:
      sorts = KINDS[specs[i].kind].attaches_to
      raise ValueError(
          f"config.experts[{i}] ({specs[i].kind}): targets "
          f"{specs[i].targets!r} matched no {' or '.join(sorts)}. " +
          " ".join(f"The model's {sort}s are:\n  " + "\n  ".join(
              name for site in sites if site.sort == sort
              for name in site.names) + "\n" for sort in sorts))
  by_name = {name: (site, [i for i, names in matches.items() if name in names])
             for site in sites for name in site.names}
  for name, (site, indices) in by_name.items():
    replacing = [i for i in indices if KINDS[specs[i].kind].replaces]
    if not replacing:
      continue
    if len(replacing) > 1:
      raise ValueError(f"config.experts{replacing} all replace the MLP block "
                       f"{name}; a block can be replaced once.")
    beside = [i for i in indices if i not in replacing]
    inside = sorted({i for other, (_, found) in by_name.items()
                     if other.startswith(name + "/") for i in found})
    if beside or inside:
      raise ValueError(
          f"config.experts{beside or inside} add adapters "
          f"{'beside' if beside else 'inside'} the MLP block {name}, which "
          f"config.experts[{replacing[0]}] ({specs[replacing[0]].kind}) "
          "replaces; adapters go with dense blocks only.")


def make_plan(expert_entries, model: nnx.Module, *,
              instance_features: int | None = None) -> stack.Plan:
  """Where `config.experts` attach in `model` (built without experts,
  abstract is enough), as the plan to build the model with.

  `instance_features`: the width of `TokenInfo.instance`, the decoder width
  (`build.build_model` gives it); only instance-routed experts need it.
  """
  specs = [ExpertSpec.parse(i, e) for i, e in enumerate(expert_entries or ())]
  sites = find_sites(model)
  matches: dict[int, list[str]] = {i: [] for i in range(len(specs))}
  layer_experts = {}  # (site path, layer index or None) -> spec indices
  for site in sites:
    for layer, name in enumerate(site.names):
      found = tuple(i for i, spec in enumerate(specs)
                    if spec.attaches(site.sort, name))
      for i in found:
        matches[i].append(name)
      layer_experts[site.path, layer] = found
  _check(specs, sites, matches)

  towers, experts = {}, {}
  for tower in {site.tower for site in sites if site.tower}:
    in_tower = [site for site in sites if site.tower == tower]
    depth = len(in_tower[0].names)
    signatures = [tuple(layer_experts[site.path, layer] for site in in_tower)
                  for layer in range(depth)]
    towers[tower] = stack.split_segments(signatures, tower)
    for segment in towers[tower]:
      for site in in_tower:
        experts[segment.path + site.path[len(tower):]] = (
            layer_experts[site.path, segment.start])
  for site in sites:
    if site.tower is None:
      experts[site.path] = layer_experts[site.path, 0]
  experts = {path: found for path, found in experts.items() if found}
  return stack.Plan(towers=towers, attach=_ExpertPlan(
      specs, experts, towers, instance_features).attach)
