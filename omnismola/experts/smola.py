"""SMoLA: soft mixtures of low-rank experts in per-modality pools.

For a wrapped linear map W and token states x, each pool adds

  SMoLA(x) with n experts E_j(z) = z A_j B_j, B_j = 0 at init,
  logits[t, j, s] = <l2n(x_t), scale * l2n(phi[:, j, s])>   (s: slot of expert j)

Bidirectional tokens form one group per example (`TokenInfo.groups`) and go
through Soft MoE proper; causal tokens (the decoder's suffix) are each their
own group, so their output sum_j w_j E_j(x_t) depends on x_t alone and is
the same in training and in cached decoding. A token outside the pool's
modality gets nothing from it. docs/experts.md explains the low-rank form
that never computes [tokens, experts, d_out].
"""
import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts import routing
from omnismola.experts.kind import LINEAR, Kind
from omnismola.models import layers
from omnismola.models.layers import TokenInfo, token_matmul


class SMoLAPool(nnx.Module):
  """n low-rank experts with p slots each, serving one modality's tokens."""

  def __init__(self, in_features: int, out_features: int, *, modality: str,
               num_experts: int, rank: int, slots_per_expert: int = 1,
               alpha: float | None = None, axes=(None, None),
               rngs: nnx.Rngs):
    if modality not in routing.MODALITIES:
      raise ValueError(f"Unknown SMoLA pool modality {modality!r}; "
                       f"expected one of {routing.MODALITIES}.")
    if num_experts < 1 or rank < 1 or slots_per_expert < 1:
      raise ValueError(
          "SMoLA pools need num_experts, rank and slots_per_expert >= 1, got "
          f"{num_experts}, {rank}, {slots_per_expert}.")
    in_axis, out_axis = axes
    self.modality = modality
    self.num_experts = num_experts
    self.rank = rank
    self.multiplier = (rank if alpha is None else alpha) / rank
    normal = jax.nn.initializers.normal(stddev=in_features**-0.5)
    self.a = nnx.Param(normal(rngs.params(), (in_features, num_experts, rank)),
                       logical_axes=(in_axis, "expert", "lora_rank"))
    self.b = nnx.Param(jnp.zeros((num_experts, rank, out_features)),
                       logical_axes=("expert", "lora_rank", out_axis))
    self.phi = nnx.Param(
        normal(rngs.params(), (in_features, num_experts, slots_per_expert)),
        logical_axes=(in_axis, "expert", None))
    self.scale = nnx.Param(jnp.ones(()), logical_axes=())

  def router_columns(self) -> jax.Array:
    """scale * l2n(phi) as [d_in, n*p]: x's logits are l2n(x) times this."""
    phi = routing.l2_normalize(self.phi[...].astype(jnp.float32), axis=0)
    return (self.scale[...] * phi).reshape(phi.shape[0], -1)

  def mix(self, h: jax.Array, logits: jax.Array,
          tokens: TokenInfo) -> jax.Array:
    """The pool's rank-space activations [B, T, n, r] from h = x A and the
    router logits [B, T, n, p]; its output is mix(h) B times the multiplier.

    Experts are linear, so a slot's output (sum_t d_t x_t) A_j B_j equals
    (sum_t d_t h_tj) B_j: Soft MoE's slots and combine work on h's blocks.
    """
    serves = routing.modality_tokens(tokens, self.modality)
    groups = tokens.groups & serves[..., None]               # [B, T, G]
    grouped = jnp.any(groups, axis=-1)
    causal = serves & ~tokens.bidirectional

    # Combine: each token's softmax over all slots of the pool; its weight
    # on an expert is the sum over the expert's slots.
    combine = jax.nn.softmax(logits, axis=(-2, -1))          # [B, T, n, p]
    expert_weight = jnp.sum(combine, axis=-1)                # [B, T, n]
    layers.record_usage(self, expert_weight * serves[..., None])
    # Soft MoE over each group's tokens of this modality: each group has its
    # own slots [B, G, n, p, r]; a bidirectional token combines its group's.
    combine = combine * grouped[..., None, None]
    dispatch = routing.grouped_softmax(logits, groups)       # over tokens
    member = groups.astype(h.dtype)
    slots = jnp.einsum("btg,btnp,btnr->bgnpr", member,
                       dispatch.astype(h.dtype), h)
    from_slots = jnp.einsum("btg,btnp,bgnpr->btnr", member,
                            combine.astype(h.dtype), slots)
    # A causal token mixes its own experts' outputs: sum_j w_j E_j(x_t).
    per_token = expert_weight * causal[..., None]
    return h * per_token[..., None].astype(h.dtype) + from_slots

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    return mix_pools([self], x, tokens)


def mix_pools(pools, x: jax.Array, tokens: TokenInfo) -> jax.Array:
  """The summed output of several pools on x [B, T, d_in].

  h = x A_cat ([B, T, sum n*r]), each pool mixing its rank blocks
  (`SMoLAPool.mix`) times its multiplier, y = h B_cat: one pair of wide
  matmuls is much faster than a pair per pool. The routers ride on the first
  product, as l2n(x) scales each token by one number: x [A_cat | phi_cat]
  gives every h and logit at once (about 10% faster on CPU), accumulated in
  float32 (in bfloat16 the router columns are rounded to bfloat16 for it).
  """
  batch, length, d_in = x.shape
  a_cat = jnp.concatenate(
      [pool.a[...].reshape(d_in, -1) for pool in pools], axis=1)
  b_cat = jnp.concatenate(
      [pool.b[...].reshape(-1, pool.b.shape[-1]) for pool in pools], axis=0)
  phi_cat = jnp.concatenate([pool.router_columns() for pool in pools], axis=1)
  hz = token_matmul(x, jnp.concatenate([a_cat, phi_cat.astype(a_cat.dtype)],
                                      axis=1),
                    preferred_element_type=jnp.float32)
  h_cat = hz[..., :a_cat.shape[1]].astype(x.dtype)
  z_cat = hz[..., a_cat.shape[1]:] * routing.inverse_norm(
      x.astype(jnp.float32))
  mixed, h_start, z_start = [], 0, 0
  for pool in pools:
    n, r, p = pool.num_experts, pool.rank, pool.phi.shape[-1]
    h = h_cat[..., h_start:h_start + n * r].reshape(batch, length, n, r)
    logits = z_cat[..., z_start:z_start + n * p].reshape(batch, length, n, p)
    mixed.append(pool.multiplier *
                 pool.mix(h, logits, tokens).reshape(batch, length, n * r))
    h_start += n * r
    z_start += n * p
  return token_matmul(jnp.concatenate(mixed, axis=-1), b_cat)


class SMoLA(nnx.Module):
  """The sum of several SMoLA pools (e.g. text, image and all tokens)."""

  def __init__(self, in_features: int, out_features: int, *,
               pools: dict[str, int], rank: int, slots_per_expert: int = 1,
               alpha: float | None = None, axes=(None, None),
               rngs: nnx.Rngs):
    if not pools:
      raise ValueError("A SMoLA adapter needs at least one pool, e.g. "
                       "pools=dict(text=16, image=16, all=16).")
    unknown = sorted(set(pools) - set(routing.MODALITIES))
    if unknown:
      raise ValueError(f"Unknown SMoLA pool(s) {unknown}; pools are keyed by "
                       f"modality, one of {routing.MODALITIES}.")
    # Sorted for a stable parameter layout whatever the config's dict order.
    self.pools = nnx.Dict({
        modality: SMoLAPool(in_features, out_features, modality=modality,
                            num_experts=pools[modality], rank=rank,
                            slots_per_expert=slots_per_expert, alpha=alpha,
                            axes=axes, rngs=rngs)
        for modality in sorted(pools) if pools[modality] > 0
    })

  def __call__(self, x: jax.Array, tokens: TokenInfo,
               base: layers.Base | None = None) -> jax.Array:
    del base  # x and its tokens alone decide.
    return mix_pools(list(self.pools.values()), x, tokens)


KIND = Kind("smola", SMoLA, (LINEAR,))
