"""Sending routed tokens to their experts and bringing the outputs back.

Every dispatch takes the router's decision for each token copy (token t's
c-th choice: expert `experts[t, c]` with weight `gates[t, c]`) and returns
y_t = sum_c gates[t, c] * MLP_{experts[t, c]}(x_t). Copies with `mask` False
(padding, or a modality no pool serves) go nowhere and return 0.

The expert MLPs are written once, against a grouped linear map
`linear(h, w [E, in, out], b [E, out] | None)`; each dispatch supplies the
grouped linear map of its own layout:

* `capacity_dispatch` (V-MoE/GShard): fixed slots per expert and group,
  one-hot einsums in and out; copies finding their expert full are dropped
  (the residual carries the token). Static shapes, no sort, but one-hot
  tensors of [group, experts, capacity].
* `ragged_dispatch`: dropless, copies sorted by expert, `jax.lax.ragged_dot`.
  The GPU/TPU form; on CPU XLA's ragged_dot is an order of magnitude slower
  than blocked and needs far more memory (benchmarks/experts.py).
* `blocked_dispatch`: dropless for CPU: tiles of one expert each, one
  batched einsum, at the cost of up to `experts * tile` padding rows and a
  [tiles, in, out] weight gather per matmul.

When no copy is dropped all three give the same result.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp

from omnismola import flops

# linear(h, w [E, in, out], b [E, out] | None) -> h @ w[expert of row] + b.
GroupedLinear = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
# expert_fn(h, linear): every expert's MLP on the rows of h (in the layout
# the grouped linear map understands).
ExpertFn = Callable[[jax.Array, GroupedLinear], jax.Array]


def capacity(capacity_factor: float, tokens: int, top_k: int,
             num_experts: int) -> int:
  """Slots per expert: ceil(capacity_factor * tokens * top_k / num_experts)."""
  return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def capacity_positions(experts: jax.Array, mask: jax.Array, num_experts: int,
                       priority: jax.Array | None = None) -> jax.Array:
  """Each copy's slot in its expert's buffer, in the order buffers fill.

  All first choices fill before any second choice (a token's top choice
  matters most). Within a choice, tokens go in sequence order, or by
  descending `priority` (batch-priority routing, V-MoE): then the tokens the
  router is surest about are the last to be dropped.

  `experts` int [G, S, k] and `mask` bool [G, S] (tokens routed at all)
  give int [G, S, k] positions, meaningless where `mask` is False;
  `priority` float [G, S] fills larger first.
  """
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)
  onehot = onehot * mask[..., None, None]                     # [G, S, k, E]
  if priority is not None:
    order = jnp.argsort(-priority, axis=1, stable=True)       # [G, S]
    onehot = jnp.take_along_axis(onehot, order[..., None, None], axis=1)
  groups, length, top_k, _ = onehot.shape
  fill = jnp.swapaxes(onehot, 1, 2).reshape(groups, top_k * length, -1)
  taken = jnp.cumsum(fill, axis=1) - fill                     # Slots before.
  taken = jnp.swapaxes(taken.reshape(groups, top_k, length, -1), 1, 2)
  positions = jnp.sum(taken * onehot, axis=-1)                # [G, S, k]
  if priority is not None:
    positions = jnp.take_along_axis(positions, jnp.argsort(order, axis=1)[
        ..., None], axis=1)
  return positions


def capacity_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array,
                      mask: jax.Array, *, expert_capacity: jax.Array,
                      slots: int, expert_fn: ExpertFn,
                      priority: jax.Array | None = None):
  """Fixed-capacity dispatch with one-hot einsums, per group of tokens.

  x [G, S, d] holds groups (sequences) that route independently; experts,
  gates [G, S, k] and mask [G, S]. `expert_capacity` int [E]: the slots each
  expert may fill (pools of different sizes differ), in a static buffer of
  `slots` >= their max; `priority` [G, S]: batch-priority fill order.
  Returns (y [G, S, d], kept bool [G, S, k]: the copies that found a slot).
  """
  num_experts = expert_capacity.shape[0]
  positions = capacity_positions(experts, mask, num_experts, priority)
  kept = mask[..., None] & (positions < expert_capacity[experts])
  expert_hot = jax.nn.one_hot(experts, num_experts, dtype=x.dtype)
  slot_hot = jax.nn.one_hot(jnp.where(kept, positions, slots), slots,
                            dtype=x.dtype)                    # Dropped: none.
  # Moving tokens by one-hot products is data movement, not model FLOPs;
  # the buffers' empty slots are padding (as if no copy were dropped).
  with flops.required_share(0.0):
    dispatch = jnp.einsum("gske,gskc->gsec", expert_hot, slot_hot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", expert_hot, slot_hot,
                         gates.astype(x.dtype))
    expert_in = jnp.einsum("gsec,gsd->gecd", dispatch, x)

  def linear(h, w, b):
    out = jnp.einsum("gecd,edm->gecm", h, w)
    return out if b is None else out + b[None, :, None]

  with flops.required_share(min(1.0, experts[0].size
                                / (num_experts * slots))):
    expert_out = expert_fn(expert_in, linear)
  with flops.required_share(0.0):
    return jnp.einsum("gsec,gecd->gsd", combine, expert_out), kept


def _grouped_rows(experts: jax.Array, mask: jax.Array, num_experts: int,
                  align: int):
  """Where each copy goes when rows are grouped by expert.

  Expert e's copies (of experts int [N, k], mask bool [N]) take consecutive
  rows starting at a multiple of `align`, experts in order, copies in token
  order. Returns (row int [N * k], past every row for unrouted copies;
  group_sizes int [E]; group_ends int [E], the aligned end of each group).
  """
  copies = experts.size
  routed = jnp.repeat(mask, experts.shape[1])
  flat = jnp.where(routed, experts.reshape(-1), num_experts)  # Unrouted last.
  group_sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1, mode="drop")
  padded = -(-group_sizes // align) * align
  group_ends = jnp.cumsum(padded)
  group_starts = group_ends - padded
  order = jnp.argsort(flat, stable=True)
  sorted_experts = flat[order]
  starts = jnp.append(jnp.cumsum(group_sizes) - group_sizes, copies)
  rank = jnp.arange(copies) - starts[sorted_experts]
  sorted_rows = jnp.append(group_starts, 0)[sorted_experts] + rank
  rows = jnp.zeros(copies, jnp.int32).at[order].set(sorted_rows)
  return jnp.where(routed, rows, jnp.iinfo(jnp.int32).max), group_sizes, (
      group_ends)


def _scatter_gather(x, rows, gates, buffer_rows, run):
  """Copies of x into a buffer at `rows`, run, and gate-weighted back."""
  top_k = gates.shape[1]
  copies = jnp.repeat(x, top_k, axis=0)
  buffer = jnp.zeros((buffer_rows, x.shape[-1]), x.dtype)
  buffer = buffer.at[rows].set(copies, mode="drop")
  back = jnp.take(run(buffer), rows, axis=0, mode="fill", fill_value=0)
  back = back.reshape(x.shape[0], top_k, -1)
  return jnp.einsum("nk,nkd->nd", gates.astype(x.dtype), back)


def ragged_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array,
                    mask: jax.Array, *, num_experts: int,
                    expert_fn: ExpertFn) -> jax.Array:
  """Dropless: sort copies by expert, `jax.lax.ragged_dot` per matmul.

  x [N, d] tokens, experts and gates [N, k], mask bool [N] -> y [N, d].
  """
  rows, group_sizes, group_ends = _grouped_rows(experts, mask, num_experts, 1)
  # The expert owning each row; E for rows past every group.
  row_expert = jnp.searchsorted(group_ends, jnp.arange(experts.size),
                                side="right")

  def linear(h, w, b):
    out = jax.lax.ragged_dot(h, w.astype(h.dtype), group_sizes)
    if b is None:
      return out
    return out + jnp.take(b, row_expert, axis=0, mode="fill", fill_value=0)

  return _scatter_gather(x, rows, gates, experts.size,
                         lambda h: expert_fn(h, linear))


def blocked_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array,
                     mask: jax.Array, *, num_experts: int, tile: int,
                     expert_fn: ExpertFn) -> jax.Array:
  """Dropless without ragged_dot: tiles of one expert each, batched einsum.

  As `ragged_dispatch`, with `tile` rows per tile: each expert's group is
  padded to a multiple.
  """
  # Sum over e of ceil(size_e / tile) <= copies // tile + E: always fits.
  num_tiles = experts.size // tile + num_experts
  rows, _, group_ends = _grouped_rows(experts, mask, num_experts, tile)
  tile_expert = jnp.minimum(jnp.searchsorted(
      group_ends, jnp.arange(num_tiles) * tile, side="right"), num_experts - 1)

  def linear(h, w, b):
    out = jnp.einsum("ntd,ndm->ntm", h, w[tile_expert])
    return out if b is None else out + b[tile_expert][:, None]

  def run(buffer):
    tiles = buffer.reshape(num_tiles, tile, -1)
    # Rows past each expert's copies are padding.
    with flops.required_share(experts.size / (num_tiles * tile)):
      return expert_fn(tiles, linear).reshape(num_tiles * tile, -1)

  return _scatter_gather(x, rows, gates, num_tiles * tile, run)
