"""Assertions shared by the loop-reference tests of the expert kinds."""
import jax
import numpy as np


def assert_values_and_grads_close(fused, reference, params, x, *,
                                  tol: float = 1e-4) -> None:
  """fused(params, x) == reference(params, x), and so are their gradients
  with respect to both arguments."""
  np.testing.assert_allclose(fused(params, x), reference(params, x),
                             rtol=tol, atol=tol)
  got = jax.grad(fused, argnums=(0, 1))(params, x)
  want = jax.grad(reference, argnums=(0, 1))(params, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol)
