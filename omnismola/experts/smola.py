"""SMoLA: soft mixtures of low-rank experts in per-modality pools.

For a wrapped linear map W and token states x, each pool adds

  SMoLA(x) with n experts E_j(z) = z A_j B_j, B_j = 0 at init,
  logits[t, j, s] = <l2n(x_t), scale * l2n(phi[:, j, s])>   (s: slot of expert j)

How tokens are mixed depends on what they may attend to (DESIGN.md section 4):

* bidirectional tokens (the vision encoder; the decoder's image + prefix) form
  one group per sequence and go through Soft MoE proper: each slot takes a
  softmax-over-tokens average of the group (dispatch), experts run on slots,
  and each token takes a softmax-over-slots average of the slot outputs
  (combine);
* causal tokens (the decoder's suffix) are each their own group: dispatch is
  the identity, so the output is sum_j w_j E_j(x_t) with w_j the token's
  combine weight summed over expert j's slots. It depends on x_t alone, hence
  it is causal and identical in training and in cached decoding.

A token outside the pool's modality gets nothing from it. The per-token path
never materialises [tokens, experts, d_out]: h = x A_cat is [tokens, n*r],
each rank block is scaled by its weight, and y = h B_cat.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.experts import routing
from omnismola.models.layers import TokenInfo

MODALITIES = ("text", "image", "all")


def pool_mask(tokens: TokenInfo, modality: str) -> jax.Array:
  """Tokens [B, T] that a pool of the given modality serves."""
  if modality == "text":
    return tokens.is_text
  if modality == "image":
    return tokens.is_image & tokens.valid
  if modality == "all":
    return tokens.valid
  raise ValueError(f"Unknown SMoLA pool modality {modality!r}; "
                   f"expected one of {MODALITIES}.")


class SMoLAPool(nnx.Module):
  """n low-rank experts with p slots each, serving one modality's tokens."""

  def __init__(self, in_features: int, out_features: int, *, modality: str,
               num_experts: int, rank: int, slots_per_expert: int = 1,
               alpha: float | None = None, axes=(None, None),
               rngs: nnx.Rngs):
    if modality not in MODALITIES:
      raise ValueError(f"Unknown SMoLA pool modality {modality!r}; "
                       f"expected one of {MODALITIES}.")
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

  def route(self, x: jax.Array, tokens: TokenInfo):
    """(per-token expert weights [B, T, n], Soft MoE output [B, T, d_out]).

    The weights are zero except on causal tokens this pool serves; the Soft
    MoE output is zero except on bidirectional ones.
    """
    serves = pool_mask(tokens, self.modality)
    grouped = serves & tokens.bidirectional
    causal = serves & ~tokens.bidirectional
    a, b = self.a[...], self.b[...]

    logits = routing.cosine_logits(x, self.phi[...], self.scale[...])
    # Combine: each token's softmax over all slots of the pool.
    combine = jax.nn.softmax(logits, axis=(-2, -1))          # [B, T, n, p]
    expert_weight = jnp.sum(combine, axis=-1) * causal[..., None]

    # Soft MoE over the sequence's bidirectional tokens of this modality.
    dispatch = routing.masked_softmax(logits, grouped[:, :, None, None],
                                      axis=1)                # over tokens
    slots_in = jnp.einsum("btnp,btd->bnpd", dispatch.astype(x.dtype), x)
    slots_out = jnp.einsum("bnpd,dnr,nro->bnpo", slots_in, a, b)
    grouped_combine = combine * grouped[..., None, None]
    y_grouped = jnp.einsum("btnp,bnpo->bto", grouped_combine.astype(x.dtype),
                           slots_out)
    return expert_weight, self.multiplier * y_grouped

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    return mix_pools([self], x, tokens)


def mix_pools(pools, x: jax.Array, tokens: TokenInfo) -> jax.Array:
  """The summed output of several pools on x [B, T, d_in].

  The per-token (causal) paths of all pools run as one low-rank product:
  h = x A_cat ([B, T, sum n*r]), each rank block scaled by its expert's
  weight (and pool multiplier), y = h B_cat. One pair of wide matmuls is much
  faster than a pair per pool, and [tokens, experts, d_out] never exists.
  """
  batch, length, d_in = x.shape
  weights, a_blocks, b_blocks = [], [], []
  y = 0.0
  for pool in pools:
    expert_weight, y_grouped = pool.route(x, tokens)
    y = y + y_grouped
    n, r = pool.num_experts, pool.rank
    weights.append(jnp.repeat(expert_weight * pool.multiplier, r, axis=-1))
    a_blocks.append(pool.a[...].reshape(d_in, n * r))
    b_blocks.append(pool.b[...].reshape(n * r, -1))
  h = x @ jnp.concatenate(a_blocks, axis=1)
  h = h * jnp.concatenate(weights, axis=-1).astype(h.dtype)
  return y + h @ jnp.concatenate(b_blocks, axis=0)


class SMoLA(nnx.Module):
  """The sum of several SMoLA pools (e.g. text, image and all tokens)."""

  def __init__(self, in_features: int, out_features: int, *,
               pools: dict[str, int], rank: int, slots_per_expert: int = 1,
               alpha: float | None = None, axes=(None, None),
               rngs: nnx.Rngs):
    if not pools:
      raise ValueError("A SMoLA adapter needs at least one pool, e.g. "
                       "pools=dict(text=16, image=16, all=16).")
    unknown = sorted(set(pools) - set(MODALITIES))
    if unknown:
      raise ValueError(f"Unknown SMoLA pool(s) {unknown}; pools are keyed by "
                       f"modality, one of {MODALITIES}.")
    # Sorted for a stable parameter layout whatever the config's dict order.
    self.pools = nnx.Dict({
        modality: SMoLAPool(in_features, out_features, modality=modality,
                            num_experts=pools[modality], rank=rank,
                            slots_per_expert=slots_per_expert, alpha=alpha,
                            axes=axes, rngs=rngs)
        for modality in sorted(pools) if pools[modality] > 0
    })

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    return mix_pools(list(self.pools.values()), x, tokens)
