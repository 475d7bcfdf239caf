"""Sparse top-k MoE against a plain per-token, per-expert loop reference."""
import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnismola.experts import dispatch
from omnismola.experts import sparse
from omnismola.models import layers
from omnismola.models.layers import TokenInfo
from omnismola.train import partitioning

import checks

B, T, WIDTH, MLP = 2, 8, 6, 10


def _tokens():
  """3 image tokens then text; the second sequence ends in 2 padding."""
  is_image = np.zeros((B, T), bool)
  is_image[:, :3] = True
  valid = np.ones((B, T), bool)
  valid[1, 6:] = False
  return TokenInfo(is_image=jnp.asarray(is_image & valid),
                   valid=jnp.asarray(valid),
                   bidirectional=jnp.asarray(valid))


def _apply(graphdef, state, params, x, tokens):
  """(y, MoEAux): the block's output and what its router reported."""
  y, reports = checks.apply_reporting(graphdef, state, params, x, tokens)
  return y, reports[""]["routing"]


def _moe(seed=0, **options):
  """A SparseMoE with every parameter random (biases included)."""
  options = dict(dict(num_experts=4, top_k=2), **options)
  module = sparse.SparseMoE(WIDTH, MLP, rngs=nnx.Rngs(seed), **options)
  graphdef, state = nnx.split(module)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  return graphdef, jax.tree.unflatten(treedef, leaves)


def _x(seed=2):
  return jax.random.normal(jax.random.key(seed), (B, T, WIDTH))


def _pool_ranges(pools):
  """pool name -> (first expert, end), pools in sorted order."""
  ranges, start = {}, 0
  for name in sorted(pools):
    ranges[name] = (start, start + pools[name])
    start += pools[name]
  return ranges


def _route(params, x, tokens, pools, top_k, capacity_factor=None,
           batch_priority=False):
  """The routing decision, token by token in float64 numpy.

  Returns {(b, t): (first, end, chosen experts, gates)} for routed tokens and
  kept [B, T, k], simulating capacity buffers filled choice by choice.
  """
  w = np.asarray(params["router"], np.float64)
  xs = np.asarray(x, np.float64)
  ranges = _pool_ranges(pools)
  routes = {}
  for b in range(B):
    for t in range(T):
      if not tokens.valid[b, t]:
        continue
      name = "all" if "all" in pools else (
          "image" if tokens.is_image[b, t] else "text")
      if name not in pools:
        continue
      first, end = ranges[name]
      logits = xs[b, t] @ w[:, first:end]
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      chosen = np.argsort(-probs)[:top_k]
      routes[b, t] = (first, end, first + chosen,
                      probs[chosen] / probs[chosen].sum())
  kept = np.ones((B, T, top_k), bool)
  if capacity_factor is not None:
    for b in range(B):
      order = range(T)
      if batch_priority:
        order = sorted(order, key=lambda t: -routes[b, t][3][0]
                       if (b, t) in routes else 0.0)
      used = {}
      for c in range(top_k):
        for t in order:
          if (b, t) not in routes:
            continue
          first, end, chosen, _ = routes[b, t]
          slots = math.ceil(capacity_factor * T * top_k / (end - first))
          e = chosen[c]
          kept[b, t, c] = used.get(e, 0) < slots
          used[e] = used.get(e, 0) + kept[b, t, c]
  return routes, kept


def _reference(params, x, routes, kept, activation):
  """y[b, t] = sum over kept choices of gate * MLP_e(x[b, t]), in jnp."""
  gelu = lambda h: jax.nn.gelu(h, approximate=True)
  layer = lambda name, e, h: h @ params["layers"][name]["kernel"][e] + (
      params["layers"][name]["bias"][e]
      if "bias" in params["layers"][name] else 0.0)
  rows = []
  for b in range(B):
    for t in range(T):
      y = jnp.zeros(WIDTH)
      if (b, t) in routes:
        first, end, chosen, _ = routes[b, t]
        probs = jax.nn.softmax(x[b, t] @ params["router"][:, first:end])
        gates = probs[chosen - first] / jnp.sum(probs[chosen - first])
        for c, e in enumerate(chosen):
          if not kept[b, t, c]:
            continue
          if activation == "geglu":
            out = layer("down", e, gelu(layer("gate", e, x[b, t])) *
                        layer("up", e, x[b, t]))
          else:
            out = layer("fc2", e, gelu(layer("fc1", e, x[b, t])))
          y = y + gates[c] * out
      rows.append(y)
  return jnp.stack(rows).reshape(B, T, WIDTH)


@pytest.mark.parametrize("kind", ["capacity", "ragged", "blocked"])
@pytest.mark.parametrize("activation", ["geglu", "gelu"])
def test_dispatch_matches_loop_reference_outputs_and_gradients(kind,
                                                               activation):
  graphdef, state = _moe(dispatch=kind, activation=activation,
                         capacity_factor=4.0)
  tokens, x = _tokens(), _x()
  params = nnx.to_pure_dict(state)
  routes, kept = _route(params, x, tokens, dict(all=4), 2)
  w = jax.random.normal(jax.random.key(3), (B, T, WIDTH))

  def fused(params, x):
    return jnp.sum(_apply(graphdef, state, params, x, tokens)[0] * w)

  def reference(params, x):
    return jnp.sum(_reference(params, x, routes, kept, activation) * w)

  checks.assert_values_and_grads_close(fused, reference, params, x)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_capacity_drops_exactly_what_the_reference_drops(batch_priority):
  graphdef, state = _moe(dispatch="capacity", capacity_factor=0.5,
                         batch_priority=batch_priority)
  tokens, x = _tokens(), _x()
  params = nnx.to_pure_dict(state)
  routes, kept = _route(params, x, tokens, dict(all=4), 2, 0.5,
                        batch_priority)
  _, other_kept = _route(params, x, tokens, dict(all=4), 2, 0.5,
                         not batch_priority)
  assert (kept != other_kept).any(), "priority must matter for this batch"

  y, aux = _apply(graphdef, state, params, x, tokens)
  np.testing.assert_allclose(y, _reference(params, x, routes, kept, "geglu"),
                             rtol=1e-4, atol=1e-4)
  routed = np.asarray(tokens.valid)[..., None]
  want_dropped = 1 - (kept & routed).sum() / (2 * routed.sum())
  assert 0 < want_dropped < 1
  np.testing.assert_allclose(aux.dropped_fraction, want_dropped, rtol=1e-6)

  # The dispatch's own record of kept copies, from the reference's choices.
  experts = np.zeros((B, T, 2), np.int32)
  gates = np.zeros((B, T, 2), np.float32)
  for (b, t), (_, _, chosen, g) in routes.items():
    experts[b, t], gates[b, t] = chosen, g
  _, got_kept = dispatch.capacity_dispatch(
      x, jnp.asarray(experts), jnp.asarray(gates), tokens.valid,
      expert_capacity=jnp.full(4, 2, jnp.int32), slots=2,
      expert_fn=lambda h, linear: h,
      priority=jnp.asarray(gates[..., 0]) if batch_priority else None)
  np.testing.assert_array_equal(got_kept, kept & routed)


def test_dropless_equals_capacity_with_a_huge_capacity_factor():
  _, state = _moe()
  params = nnx.to_pure_dict(state)
  outputs = []
  for kind in ("capacity", "blocked", "ragged"):
    graphdef, state = _moe(dispatch=kind, capacity_factor=100.0)
    outputs.append(_apply(graphdef, state, params, _x(), _tokens()))
  for y, aux in outputs[1:]:
    np.testing.assert_allclose(y, outputs[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(aux), jax.tree.leaves(outputs[0][1])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile", [1, 4, 8])
def test_blocked_dispatch_equals_ragged_dot(tile):
  """The CPU dropless form against jax.lax.ragged_dot, values and grads.

  16 routed copies over 6 experts: with tiles of 4 or 8 most groups are
  mostly padding, so the static buffer is close to full.
  """
  n, k, experts_n = 9, 2, 6
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (n, WIDTH))
  w = jax.random.normal(keys[1], (experts_n, WIDTH, MLP))
  b = jax.random.normal(keys[2], (experts_n, MLP))
  experts = jax.random.randint(keys[3], (n, k), 0, experts_n)
  gates = jax.random.uniform(keys[4], (n, k))
  mask = jnp.arange(n) != 4

  def loss(fn, x, w, b, **kw):
    y = fn(x, experts, gates, mask, num_experts=experts_n,
           expert_fn=lambda h, linear: linear(h, w, b), **kw)
    return jnp.sum(jnp.sin(y))

  want = jax.value_and_grad(
      lambda *a: loss(dispatch.ragged_dispatch, *a), argnums=(0, 1, 2))(
          x, w, b)
  got = jax.value_and_grad(
      lambda *a: loss(dispatch.blocked_dispatch, *a, tile=tile),
      argnums=(0, 1, 2))(x, w, b)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["capacity", "blocked"])
def test_padding_gets_no_expert_and_does_not_count(kind):
  graphdef, state = _moe(dispatch=kind, capacity_factor=1.0)
  params = nnx.to_pure_dict(state)
  tokens, x = _tokens(), _x()
  y, aux = _apply(graphdef, state, params, x, tokens)
  np.testing.assert_array_equal(y[1, 6:], 0)
  assert float(jnp.sum(aux.tokens_per_expert)) == 2 * int(tokens.valid.sum())
  # Whatever the padding holds, nothing else changes.
  y2, aux2 = _apply(graphdef, state, params, x.at[1, 6:].set(7.0), tokens)
  np.testing.assert_allclose(y2, y, atol=1e-6)
  for got, want in zip(jax.tree.leaves(aux2), jax.tree.leaves(aux)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_modality_pools_route_only_within_their_pool():
  pools = dict(image=3, text=2)
  graphdef, state = _moe(num_experts=None, pools=pools, top_k=2)
  params = nnx.to_pure_dict(state)
  tokens, x = _tokens(), _x()
  y, aux = _apply(graphdef, state, params, x, tokens)
  routes, kept = _route(params, x, tokens, pools, 2)
  np.testing.assert_allclose(y, _reference(params, x, routes, kept, "geglu"),
                             rtol=1e-4, atol=1e-4)
  counts = np.asarray(aux.tokens_per_expert)
  image, text = int(tokens.is_image.sum()), int(tokens.is_text.sum())
  assert counts[:3].sum() == 2 * image and counts[3:].sum() == 2 * text
  # Text experts' weights never reach image tokens, and vice versa.
  changed = jax.tree.map(lambda a: a, params)
  changed["layers"]["down"]["kernel"] = params["layers"]["down"][
      "kernel"].at[3:].add(1.0)
  y2, _ = _apply(graphdef, state, changed, x, tokens)
  is_image = np.asarray(tokens.is_image)
  np.testing.assert_array_equal(y2[is_image], y[is_image])
  assert not np.allclose(y2[np.asarray(tokens.is_text)],
                         y[np.asarray(tokens.is_text)])


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("activation", ["geglu", "gelu"])
def test_dense_fallback_serves_the_modality_without_a_pool(modality,
                                                           activation):
  """VL-MoE's one-modality MoE: the pooled modality routes as before; the
  other tokens (and padding) go through the dense MLP at the block's own
  paths, as a dense block would compute them; without it they get 0."""
  pools = {modality: 3}
  options = dict(num_experts=None, pools=pools, top_k=2,
                 activation=activation)
  graphdef, state = _moe(dense_fallback=True, **options)
  params = nnx.to_pure_dict(state)
  dense_names = {"geglu": {"gate", "up", "down"}, "gelu": {"fc1", "fc2"}}
  assert set(params) == {"router", "layers"} | dense_names[activation]
  tokens, x = _tokens(), _x()
  y, aux = _apply(graphdef, state, params, x, tokens)
  routes, kept = _route(params, x, tokens, pools, 2)
  routed = np.zeros((B, T), bool)
  routed[tuple(np.array(list(routes)).T)] = True
  want = _reference(params, x, routes, kept, activation)
  np.testing.assert_allclose(y[routed], want[routed], rtol=1e-4, atol=1e-4)
  dense_graphdef, dense_state = nnx.split(layers.MLPS[activation](
      WIDTH, MLP, rngs=nnx.Rngs(0)))
  dense_y = checks.apply_with(
      dense_graphdef, dense_state,
      {name: params[name] for name in dense_names[activation]}, x, tokens)
  np.testing.assert_allclose(y[~routed], dense_y[~routed], rtol=1e-4,
                             atol=1e-4)
  assert np.abs(np.asarray(y[~routed])).min() > 0
  assert float(aux.dropped_fraction) == 0.0
  # The same module without the fallback: 0 where no pool serves.
  plain_graphdef, plain_state = _moe(**options)
  plain = {k: params[k] for k in ("router", "layers")}
  plain_y, _ = _apply(plain_graphdef, plain_state, plain, x, tokens)
  np.testing.assert_array_equal(plain_y[~routed], 0.0)
  np.testing.assert_allclose(plain_y[routed], y[routed], rtol=1e-6)


@pytest.mark.parametrize("pools", [dict(all=4), dict(image=3, text=2)])
def test_losses_and_stats_equal_hand_computation(pools):
  graphdef, state = _moe(num_experts=None, pools=pools)
  params = nnx.to_pure_dict(state)
  tokens, x = _tokens(), _x()
  _, aux = _apply(graphdef, state, params, x, tokens)
  routes, _ = _route(params, x, tokens, pools, 2)

  w, xs = np.asarray(params["router"], np.float64), np.asarray(x, np.float64)
  z, entropy, balance, violation = [], [], 0.0, 0.0
  for first, end in _pool_ranges(pools).values():
    mine = [(bt, r) for bt, r in routes.items() if r[0] == first]
    counts, prob_sum = np.zeros(end - first), np.zeros(end - first)
    for (b, t), (_, _, chosen, _) in mine:
      logits = xs[b, t] @ w[:, first:end]
      probs = np.exp(logits) / np.exp(logits).sum()
      z.append(np.log(np.exp(logits).sum())**2)
      entropy.append(-(probs * np.log(probs)).sum())
      counts[chosen - first] += 1
      prob_sum += probs
    f, p = counts / (2 * len(mine)), prob_sum / len(mine)
    balance += len(mine) / len(routes) * (end - first) * (f * p).sum()
    violation = max(violation, counts.max() / counts.mean() - 1)
  np.testing.assert_allclose(aux.z_loss, np.mean(z), rtol=1e-5)
  np.testing.assert_allclose(aux.balance_loss, balance, rtol=1e-5)
  np.testing.assert_allclose(aux.router_entropy, np.mean(entropy), rtol=1e-5)
  np.testing.assert_allclose(aux.max_violation, violation, rtol=1e-5)
  assert float(aux.dropped_fraction) == 0.0


def _aux_of(logits, experts, routed=None, allowed=None):
  """routing_aux of one pool of E experts: logits [N, E], experts [N, k]."""
  logits, experts = jnp.asarray(logits, jnp.float32), jnp.asarray(experts)
  n, e = logits.shape
  routed = jnp.ones(n, bool) if routed is None else jnp.asarray(routed)
  allowed = jnp.ones((n, e), bool) if allowed is None else jnp.asarray(allowed)
  probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  pool_size = jnp.sum(allowed[0]) * jnp.ones(e)
  return sparse.routing_aux(logits, probs, experts, routed, allowed, pool_size,
                            kept=jnp.ones(experts.shape, bool))


def test_uniform_routing_gives_balance_loss_one_and_known_values():
  """Zero logits over 4 experts, tokens dealt round-robin: Switch's balance
  4 * sum(1/4 * 1/4) = 1, z-loss log(4)^2, entropy log(4), no violation."""
  aux = _aux_of(np.zeros((8, 4)), np.arange(8)[:, None] % 4)
  np.testing.assert_allclose(aux.balance_loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux.z_loss, 1.9218120556728056, rtol=1e-6)
  np.testing.assert_allclose(aux.router_entropy, 1.3862943611198906, rtol=1e-6)
  np.testing.assert_array_equal(aux.tokens_per_expert, [2, 2, 2, 2])
  assert float(aux.max_violation) == 0.0


def test_collapsed_routing_gives_balance_loss_e_and_known_values():
  """Every token sure of expert 0: balance 4 * (1 * 1) = 4, and the
  violation is 4 tokens over a mean load of 1: 3."""
  logits = np.full((4, 4), -30.0)
  logits[:, 0] = 0.0
  aux = _aux_of(logits, np.zeros((4, 1), int))
  np.testing.assert_allclose(aux.balance_loss, 4.0, rtol=1e-6)
  np.testing.assert_allclose(aux.max_violation, 3.0, rtol=1e-6)
  # logsumexp([0, -30, -30, -30]) = log(1 + 3 e^-30), squared: ~0.
  np.testing.assert_allclose(aux.z_loss, 0.0, atol=1e-12)


def test_z_loss_of_a_fixed_row_by_hand():
  """Logits [1, 2, 3, 4]: logsumexp = 4 + log(1 + e^-1 + e^-2 + e^-3)
  = 4.4401897, squared 19.715285; a pool of the first two experts:
  2 + log(1 + e^-1) = 2.3132617, squared 5.3511797. Padding counts not."""
  row = [1.0, 2.0, 3.0, 4.0]
  full = _aux_of([row, [50.0] * 4], [[3], [0]], routed=[True, False])
  np.testing.assert_allclose(full.z_loss, 19.715285, rtol=1e-6)
  pool = _aux_of([row], [[1]], allowed=[[True, True, False, False]])
  np.testing.assert_allclose(pool.z_loss, 5.3511797, rtol=1e-6)


@pytest.mark.parametrize("kind", ["capacity", "blocked"])
def test_experts_sharded_over_the_expert_axis_give_the_same_result(kind):
  graphdef, state = _moe(num_experts=8, dispatch=kind)
  tokens, x = _tokens(), _x()
  params = nnx.to_pure_dict(state)
  want_y, want_aux = _apply(graphdef, state, params, x, tokens)

  mesh = partitioning.make_mesh(dict(data=2, expert=4))
  shardings = partitioning.state_shardings(
      state, partitioning.DEFAULT_RULES, mesh)
  assert shardings["layers"]["gate"]["kernel"].spec[0] == "expert"
  assert shardings["router"].spec[1] == "expert"
  sharded = jax.device_put(params, shardings)
  y, aux = jax.jit(lambda p, x: _apply(graphdef, state, p, x, tokens))(
      sharded, x)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(aux), jax.tree.leaves(want_aux)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(num_experts=4, pools=dict(all=4)), "exactly one"),
    (dict(num_experts=None, pools=dict(all=4, image=2)), "pools must"),
    (dict(num_experts=1), "at least top_k"),
    (dict(num_experts=4, dispatch="dropples"), "Unknown sparse MoE dispatch"),
    (dict(num_experts=4, activation="relu"), "Unknown activation"),
    (dict(num_experts=None, pools=dict(image=2, text=2), dense_fallback=True),
     "dense_fallback serves the modality without a pool"),
])
def test_bad_options_fail_clearly(options, message):
  with pytest.raises(ValueError, match=message):
    sparse.SparseMoE(WIDTH, MLP, rngs=nnx.Rngs(0), **options)


def test_dispatch_benchmark_runs_every_dispatch():
  from benchmarks import experts  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(experts=4, top_k=2, width=8, mlp_dim=8, tokens=32,
                            length=16, capacity_factor=1.0, repeats=1)
  rows = experts.run(args)
  assert [(r["dispatch"], r["passes"]) for r in rows] == [
      (kind, name) for kind in experts.DISPATCHES
      for name in ("forward", "fwd+bwd")]
  assert all(r["seconds"] > 0 for r in rows)
  # A huge capacity drops nothing, so all three compute the same loss.
  args.capacity_factor = 8.0
  losses = [r["loss"] for r in experts.run(args) if r["passes"] == "forward"]
  np.testing.assert_allclose(losses, losses[0], rtol=1e-5)
  assert np.isfinite(losses[0]) and losses[0] > 0
