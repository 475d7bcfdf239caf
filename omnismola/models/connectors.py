"""Connectors: vision tokens [B, N, d_vit] -> decoder inputs [B, N, d_dec].

`make_connector(kind, ...)` is the one entry point; kinds register in
`CONNECTORS`, so the MLP, MoE-MLP (CuMo) and multi-encoder (MoME's MoVE)
connectors slot in beside `linear` without touching the VLM.
"""
import jax
from flax import nnx

from omnismola.models.layers import LinearFactory, TokenInfo


class LinearConnector(nnx.Module):
  """One projection, as in PaliGemma."""

  def __init__(self, path: str, in_features: int, out_features: int, *,
               make_linear: LinearFactory, rngs: nnx.Rngs):
    # Both sides are model widths; `embed` twice lets the sharding rules
    # shard one of them (they never shard a mesh axis twice).
    self.proj = make_linear(f"{path}/proj", in_features, out_features,
                            axes=("embed", "embed"), use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array, tokens: TokenInfo) -> jax.Array:
    return self.proj(x, tokens)


CONNECTORS = {
    "linear": LinearConnector,
}


def make_connector(kind: str, path: str, in_features: int, out_features: int,
                   *, make_linear: LinearFactory,
                   rngs: nnx.Rngs) -> nnx.Module:
  """The connector of the given kind, called as `connector(x, tokens)`."""
  if kind not in CONNECTORS:
    raise ValueError(f"Unknown connector {kind!r}; known connectors: "
                     f"{sorted(CONNECTORS)}.")
  return CONNECTORS[kind](path, in_features, out_features,
                          make_linear=make_linear, rngs=rngs)
