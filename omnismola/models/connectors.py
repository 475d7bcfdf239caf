"""Connectors: vision tokens [B, N, d_vit] -> decoder inputs [B, N, d_dec].

`make_connector(kind, ...)` is the one entry point; kinds register in
`CONNECTORS`, so the multi-encoder connector (MoME's MoVE) slots in beside
`linear` and `mlp` without touching the VLM. Connectors return `(y, aux)`
like MLP blocks (aux {module path: aux}, {} without routers).

CuMo's MoE connector is not a kind of its own: the `mlp` connector builds
its block through the MLP factory at `connector/mlp`, so a `sparse_moe`
entry of `config.experts` with `targets='connector/mlp'` replaces it, with
the same options, upcycling and aux losses as the towers' MLPs.
"""
import jax
from flax import nnx

from omnismola.models.layers import (LinearFactory, MlpFactory, TokenInfo,
                                     keyed_aux)


class LinearConnector(nnx.Module):
  """One projection, as in PaliGemma."""

  def __init__(self, path: str, in_features: int, out_features: int, *,
               make_linear: LinearFactory, make_mlp: MlpFactory,
               rngs: nnx.Rngs):
    del make_mlp  # No MLP block here.
    # Both sides are model widths; `embed` twice lets the sharding rules
    # shard one of them (they never shard a mesh axis twice).
    self.proj = make_linear(f"{path}/proj", in_features, out_features,
                            axes=("embed", "embed"), use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    return self.proj(x, tokens), {}


class MlpConnector(nnx.Module):
  """LLaVA-1.5's (and CuMo's) projector: fc2(gelu(fc1(x))), hidden d_dec.

  The block is the ViT's `Mlp` layout (biases, tanh GELU) at
  `<path>/mlp`, so `sparse_moe` experts of `gelu` activation mirror it.
  """

  def __init__(self, path: str, in_features: int, out_features: int, *,
               make_linear: LinearFactory, make_mlp: MlpFactory,
               rngs: nnx.Rngs):
    self.mlp_path = f"{path}/mlp"
    self.mlp = make_mlp(self.mlp_path, in_features, out_features,
                        activation="gelu", make_linear=make_linear,
                        rngs=rngs, out_features=out_features)

  def __call__(self, x: jax.Array, tokens: TokenInfo):
    y, aux = self.mlp(x, tokens)
    return y, keyed_aux(self.mlp_path, aux)


CONNECTORS = {
    "linear": LinearConnector,
    "mlp": MlpConnector,
}


def make_connector(kind: str, path: str, in_features: int, out_features: int,
                   *, make_linear: LinearFactory, make_mlp: MlpFactory,
                   rngs: nnx.Rngs) -> nnx.Module:
  """The connector of the given kind, called as `y, aux = connector(x,
  tokens)`."""
  if kind not in CONNECTORS:
    raise ValueError(f"Unknown connector {kind!r}; known connectors: "
                     f"{sorted(CONNECTORS)}.")
  return CONNECTORS[kind](path, in_features, out_features,
                          make_linear=make_linear, make_mlp=make_mlp,
                          rngs=rngs)
