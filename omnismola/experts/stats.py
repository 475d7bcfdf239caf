"""The trainer's view of routers: weighted auxiliary losses and routing stats.

A model's forward pass returns what its routers reported, {router path:
{report name: value}}; sparse MoE blocks report `routing` (a `MoEAux`),
with a leading layer axis inside a scanned stack. Losses are averaged over
a stack's layers so that a weight does not grow with depth.
"""
import jax
import jax.numpy as jnp

# Losses a router may report, and the statistics logged per block.
LOSSES = ("balance_loss", "z_loss")
STATS = ("max_violation", "router_entropy", "dropped_fraction")


def routing_reports(reports: dict) -> dict:
  """{router path: MoEAux} of the routers that reported `routing`."""
  return {path: report["routing"] for path, report in reports.items()
          if "routing" in report}


def weighted_aux_loss(reports: dict, weights: dict) -> jax.Array:
  """sum over blocks and loss names of weight * (loss averaged over layers)."""
  unknown = sorted(set(weights) - set(LOSSES))
  if unknown:
    raise ValueError(f"Unknown auxiliary loss weight(s) {unknown}; losses "
                     f"are {LOSSES}.")
  total = jnp.zeros((), jnp.float32)
  for block in routing_reports(reports).values():
    for name, weight in weights.items():
      if weight:
        total = total + weight * jnp.mean(getattr(block, name))
  return total


def routing_metrics(reports: dict) -> dict[str, jax.Array]:
  """{'moe/<path>/<stat>': scalar averaged over layers} for every router."""
  return {f"moe/{path}/{name}": jnp.mean(getattr(block, name))
          for path, block in routing_reports(reports).items()
          for name in LOSSES + STATS}
