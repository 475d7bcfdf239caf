"""Upcycling: dense parameters into the initial parameters of experts.

Sparse upcycling (Komatsuzaki et al., 2023; CuMo) starts every expert of a
sparse MoE as a copy of the dense MLP block it replaces. With the k gates
renormalised to sum to 1 and no token dropped, sum_c g_c MLP(x) = MLP(x)
whatever the fresh router says, so the MoE model starts as its dense
parent. Awaker2.5-VL's second stage likewise turns one trained LoRA into
several LoRA experts (`upcycle_lora`).

Pure functions over parameter pytrees (as `nnx.to_pure_dict` gives);
leading axes, such as a scanned stack's [depth, ...], are kept. Optional
Gaussian noise makes the copies, and so their gradients, differ.
"""
import jax
import jax.numpy as jnp


def expert_copies(params, num_experts: int, *, noise_std: float = 0.0,
                  key: jax.Array | None = None):
  """`params` with an expert axis: every leaf copied `num_experts` times.

  Leaves are matrices [..., in, out] (kernels, LoRA's `a` and `b`) or
  biases [..., out] (leaves named `bias`). The expert axis goes just before
  those trailing dims, the layout of `sparse.ExpertLinear`: a stacked kernel
  [depth, in, out] becomes [depth, E, in, out]. `noise_std` (with a PRNG
  `key`) adds independent Gaussian noise to every copy; leaves keep their
  dtypes.
  """
  if noise_std and key is None:
    raise ValueError("expert_copies: noise_std > 0 needs a PRNG key.")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = (jax.random.split(key, len(leaves)) if noise_std
          else [None] * len(leaves))

  def copy(path, leaf, leaf_key):
    trailing = 1 if getattr(path[-1], "key", None) == "bias" else 2
    if leaf.ndim < trailing:
      raise ValueError(f"expert_copies: {jax.tree_util.keystr(path)} has "
                       f"shape {leaf.shape}; expected a matrix [..., in, "
                       "out] or a bias [..., out].")
    axis = leaf.ndim - trailing
    out = jnp.repeat(jnp.expand_dims(leaf, axis), num_experts, axis=axis)
    if noise_std:
      out = out + noise_std * jax.random.normal(leaf_key, out.shape,
                                                out.dtype)
    return out

  return jax.tree_util.tree_unflatten(
      treedef, [copy(p, l, k) for (p, l), k in zip(leaves, keys)])


def upcycle_mlp(dense, moe, *, noise_std: float = 0.0,
                key: jax.Array | None = None):
  """`moe`, a SparseMoE's fresh parameters {router, layers}, with `layers`
  replaced by copies of the `dense` block's (`Mlp` or `GeGLU`, possibly
  stacked). The router is kept (it has no dense counterpart); `moe`'s
  shapes say how many experts to make. `noise_std`, `key`: `expert_copies`.
  """
  num_experts = moe["router"].shape[-1]
  layers = expert_copies(dense, num_experts, noise_std=noise_std, key=key)
  _check_fits("upcycle_mlp", "the dense block's copies", layers,
              "the MoE's experts", moe["layers"])
  return {**moe, "layers": layers}


def upcycle_lora(lora, sparse_lora, *, noise_std: float = 0.0,
                 key: jax.Array | None = None):
  """`sparse_lora`, a SparseLoRA's fresh parameters, with `experts` (and
  `global_expert`) replaced by copies of one `lora`'s {a, b}; router and
  scale are kept.

  Awaker2.5-VL's second stage: with top-1 routing and a global expert the
  gates sum to 1 (g + (1 - g)), so without noise the upcycled adapter
  computes the LoRA on every real token. The noise (`expert_copies`) goes
  on the routed experts; the global expert is an exact copy.
  """
  num_experts = sparse_lora["experts"]["a"].shape[-3]
  copies = {"experts": expert_copies(lora, num_experts, noise_std=noise_std,
                                     key=key)}
  if "global_expert" in sparse_lora:
    copies["global_expert"] = lora
  fresh = {name: sparse_lora[name] for name in copies}
  _check_fits("upcycle_lora", "the LoRA's copies", copies,
              "the sparse_lora's experts", fresh)
  return {**sparse_lora, **copies}


def _check_fits(caller: str, what: str, copies, into: str, fresh) -> None:
  """Raises unless `copies` has the shapes of the `fresh` parameters."""
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  if shapes(copies) != shapes(fresh):
    raise ValueError(f"{caller}: {what} {shapes(copies)} do not fit {into} "
                     f"{shapes(fresh)}.")
