"""Towers of layers: segments of identical layers, each one scanned stack.

A stack of identical layers is created once under `nnx.vmap` (every
parameter gets a leading `layers` axis) and applied with `lax.scan`, so the
compiled program holds one layer body whatever the depth.

Expert configs address single layers by their index in the whole tower
(`decoder/layers/3/attn/q`). Layers whose experts differ cannot share a
stack, so a tower is split into segments, runs of consecutive layers that
get the same experts (a `Plan`, derived by experts/attach.py): one segment
keeps the stack at `decoder/layers` (the layout of converted checkpoints);
several live at `decoder/layers_0_4`, `decoder/layers_4_8` ([start, stop)),
siblings run one after the other. `add_tower_layers` builds a tower's
segments and attaches the plan's experts to each layer as it is created,
so they get the layer axis too; `scan_tower` runs them, returning routers'
reports stacked along the layer axis, and per-layer inputs and outputs
(the KV cache, which layers slide) keep an axis over the whole tower.
`restack` loads a checkpoint written with another segmentation.

A `LayerLoop` says how a tower runs its layers (docs/models.md): the remat
policy, and scanned or unrolled (`scan_layers=False` lets XLA optimise
across layers; parameters stay stacked either way).
"""
import dataclasses
import re
from typing import Any, Callable, Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnismola.models import layers

# Name -> what the backward pass may keep of a layer's forward pass.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # No remat: keep every activation (fastest, most memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

LAYER_AXIS = "layers"


@dataclasses.dataclass(frozen=True)
class LayerLoop:
  """How a tower runs its stacked layers: what the backward pass may keep
  of each (a key of REMAT_POLICIES), and scanned or unrolled."""
  remat_policy: str = "none"
  scan: bool = True

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; choose "
                       f"one of {sorted(REMAT_POLICIES)}.")


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers [start, stop) of a tower, one stack with parameters at `path`."""
  path: str
  start: int
  stop: int

  @property
  def attribute(self) -> str:
    """The attribute of the tower's owner holding the stack."""
    return self.path.rsplit("/", 1)[-1]


def join(prefix: str, name: str) -> str:
  return f"{prefix}/{name}" if prefix else name


def split_segments(signatures: list[Hashable], prefix: str
                   ) -> tuple[Segment, ...]:
  """Runs of consecutive layers with equal signatures, as segments: the
  whole tower at `prefix`, or parts at `prefix_start_stop`."""
  depth, starts = len(signatures), [0]
  starts += [i for i in range(1, depth) if signatures[i] != signatures[i - 1]]
  stops = starts[1:] + [depth]
  return tuple(
      Segment(prefix if (start, stop) == (0, depth)
              else f"{prefix}_{start}_{stop}", start, stop)
      for start, stop in zip(starts, stops))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a model's towers are split and where experts attach.

  Attributes:
    prefix: the path of the module the plan is handed to ("" for the VLM).
    towers: {tower path: its segments}; towers not listed are one segment.
    attach: `attach(module, path, rngs)` adds experts to `module` (built at
      `path`) and its children: each stacked layer as it is created, then
      the rest of the model (`experts/attach.py`).
  """
  prefix: str = ""
  towers: Mapping[str, tuple[Segment, ...]] = dataclasses.field(
      default_factory=dict)
  attach: Callable[[nnx.Module, str, nnx.Rngs], None] = (
      lambda module, path, rngs: None)

  def child(self, name: str) -> "Plan":
    """The plan of the child `name` of the module at `prefix`."""
    return dataclasses.replace(self, prefix=join(self.prefix, name))

  def segments(self, name: str, depth: int) -> tuple[Segment, ...]:
    """The segments of the tower `name` (of `depth` layers) at `prefix`."""
    path = join(self.prefix, name)
    return self.towers.get(path, (Segment(path, 0, depth),))


def create_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """`depth` independently initialised layers as one stacked module."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make_layer(rngs)

  stack = create(rngs)
  for _, node in nnx.iter_graph(stack):
    if isinstance(node, nnx.Param):
      axes = node.get_metadata().get("logical_axes")
      if axes is not None:
        node.set_metadata("logical_axes", (LAYER_AXIS,) + tuple(axes))
  return stack


def add_tower_layers(owner: nnx.Module, name: str,
                     make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int,
                     plan: Plan, rngs: nnx.Rngs) -> tuple[Segment, ...]:
  """Creates the `depth` layers `make_layer(rngs)` of the tower `name` of
  `owner` (the module at `plan.prefix`), one stack per segment, each set
  on `owner` under its `Segment.attribute` with the plan's experts.
  Returns the segments, for `scan_tower`."""
  segments = plan.segments(name, depth)
  for segment in segments:

    def make_with_experts(rngs, segment=segment):
      layer = make_layer(rngs)
      plan.attach(layer, segment.path, rngs)
      return layer

    layer_stack = create_stack(make_with_experts, segment.stop - segment.start,
                               rngs)
    layer_stack.layer_span = (segment.start, segment.stop)
    setattr(owner, segment.attribute, layer_stack)
  return segments


def _scan_stack(stack: nnx.Module, body: Callable, carry, xs, *, path: str,
                loop: LayerLoop):
  """`scan_tower` over one segment's `stack` (a module from `create_stack`),
  its reports keyed under the stack's module `path`."""
  policy = REMAT_POLICIES[loop.remat_policy]
  # A plain lax.scan over the split state rather than nnx.scan: callers run
  # stacks inside their own loops (decoding's while_loop) under traces the
  # module was not created in, which NNX's transforms refuse. Layers are
  # therefore stateless in the forward pass (no mutated variables).
  graphdef, state = nnx.split(stack)

  def apply(carry, layer_xs):
    layer_state, x = layer_xs
    layer = nnx.merge(graphdef, layer_state)
    carry, y = body(layer, carry, x)
    # Reports sown inside the scan must leave it as an output (scan's layer
    # is rebuilt every step).
    return carry, (y, layers.pop_reports(layer, prefix=path))

  if policy is not None:
    apply = jax.checkpoint(apply, policy=policy, prevent_cse=False)
  if loop.scan:
    carry, (ys, reports) = jax.lax.scan(apply, carry, (state, xs))
    return carry, ys, reports
  outputs = []
  for i in range(jax.tree.leaves(state)[0].shape[0]):
    carry, out = apply(carry, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
    outputs.append(out)
  ys, reports = jax.tree.map(lambda *o: jnp.stack(o), *outputs)
  return carry, ys, reports


def scan_tower(owner: nnx.Module, segments: tuple[Segment, ...],
               body: Callable, carry, xs, *, loop: LayerLoop = LayerLoop()):
  """Runs `carry, y = body(layer, carry, x)` over the layers of a tower,
  segment after segment.

  `owner` and `segments` are what `add_tower_layers` set and returned;
  `x` is layer i's slice of `xs`, per-layer inputs with a leading axis over
  the whole tower (e.g. a KV cache), () for none.

  Returns:
    (final carry, ys stacked over the whole tower, reports): each segment's
    routers' reports ({'<segment path>/<router path>': {name: value}}),
    every leaf stacked over the segment's layers.
  """
  parts, reports = [], {}
  for segment in segments:
    carry, ys, segment_reports = _scan_stack(
        getattr(owner, segment.attribute), body, carry,
        jax.tree.map(lambda x: x[segment.start:segment.stop], xs),
        path=segment.path, loop=loop)
    parts.append(ys)
    reports.update(segment_reports)
  return carry, jax.tree.map(lambda *y: jnp.concatenate(y), *parts), reports


# `<tower>/layers[_<start>_<stop>]/<rest>`: a stacked parameter's path.
_STACKED_PATH = re.compile(r"^(?P<path>(?P<tower>.*?/layers)"
                           r"(?:_(?P<start>\d+)_(?P<stop>\d+))?)/(?P<rest>.+)$")


def _stacked_key(key: str, shape) -> tuple[str, str, int, int, str] | None:
  """(tower, segment path, start, stop, rest) of a stacked parameter path;
  a whole tower's layers are its arrays' leading axis."""
  match = _STACKED_PATH.match(key)
  if match is None or not shape:
    return None
  start, stop = match.group("start", "stop")
  span = (0, shape[0]) if start is None else (int(start), int(stop))
  return match["tower"], match["path"], *span, match["rest"]


def _join_layers(pieces: list[tuple[int, int, Any]], start: int, stop: int):
  """Layers [start, stop) from pieces (first, end, array [end - first, ...]),
  or None if some layer is in none of them."""
  parts, at = [], start
  while at < stop:
    piece = next(((first, end, array) for first, end, array in pieces
                  if first <= at < end), None)
    if piece is None:
      return None
    first, end, array = piece
    parts.append(np.asarray(array)[at - first:min(stop, end) - first])
    at = min(stop, end)
  return parts[0] if len(parts) == 1 else np.concatenate(parts)


def restack(source: dict, target: dict) -> dict:
  """`source` ({path: array}, a checkpoint) plus its stacked arrays split
  into the segments of `target` ({path: array or shape}, a model): e.g.
  `decoder/layers/mlp/up/kernel` [depth, ...] (or pieces of it from other
  segments) also as `decoder/layers_0_4/mlp/up/kernel` [4, ...]. So a dense
  checkpoint also gives the dense MLPs of MoE segments, for upcycling.
  """
  segments: dict[str, set] = {}
  for key, value in target.items():
    parsed = _stacked_key(key, np.shape(value))
    if parsed is not None:
      tower, path, start, stop, _ = parsed
      segments.setdefault(tower, set()).add((path, start, stop))
  pieces: dict[tuple[str, str], list] = {}
  for key, value in source.items():
    parsed = _stacked_key(key, np.shape(value))
    if parsed is not None and parsed[0] in segments:
      tower, _, start, stop, rest = parsed
      pieces.setdefault((tower, rest), []).append((start, stop, value))
  joined = dict(source)
  for (tower, rest), tower_pieces in pieces.items():
    for path, start, stop in segments[tower]:
      key = f"{path}/{rest}"
      if key not in joined:
        layers_array = _join_layers(tower_pieces, start, stop)
        if layers_array is not None:
          joined[key] = layers_array
  return joined
