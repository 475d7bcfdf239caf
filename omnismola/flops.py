r"""FLOPs counted from the traced program, not from a second model.

`count(fn, *args)` traces `fn` on abstract arguments (nothing runs) and adds
up its matrix products (2 FLOPs per multiply-add; elementwise work is left
out), so a new layer or expert kind needs nothing here. Two totals:
`computed`, every product run once dead code is removed; `required`, the
model FLOPs MFU is against: without remat's recomputation, and with the
products a module wraps in `required_share(fraction)` (work computed but
not needed, e.g. routed experts a token did not choose) scaled. See
docs/performance.md.
"""
import contextlib
import dataclasses
import math
import re

import jax
# JAX's own dead-code elimination: no public API offers it.
from jax._src.interpreters import partial_eval
from jax.extend import core as jax_core

_SHARE_SCOPE = "required_share="
_SHARE = re.compile(re.escape(_SHARE_SCOPE) + r"([0-9.e+-]+)")
_REMAT = "rematted_computation"

# bf16 dense peak FLOP/s by `jax.Device.device_kind` substring, first match
# wins (so "H100 PCIe" before "H100"). MFU is against this peak whatever the
# step's dtype, as MFU is conventionally reported.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    # NVIDIA datasheets, https://www.nvidia.com/en-us/data-center/{h100,
    # h200,a100}/: bf16 dense is half the 2:4-sparsity TFLOPS (H100 PCIe
    # 1,513; H100 SXM and H200 1,979); the A100's 312 is dense.
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    # Google Cloud TPU system architecture pages, bf16 peak per chip:
    # https://cloud.google.com/tpu/docs/v4 (275),
    # https://cloud.google.com/tpu/docs/v5e (197; device_kind "TPU v5 lite"),
    # https://cloud.google.com/tpu/docs/v5p (459).
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
)


def peak_flops(device_kind: str) -> float | None:
  """The bf16 dense peak FLOP/s of a device kind, or None when unknown."""
  return next((peak for key, peak in PEAK_FLOPS if key in device_kind), None)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
  return flops_per_step / (step_seconds * num_devices * peak)


@contextlib.contextmanager
def required_share(fraction: float):
  """Marks the products traced inside as needed only in this share (0: not
  at all); nested shares multiply."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"A required share is in [0, 1], got {fraction}.")
  with jax.named_scope(f"{_SHARE_SCOPE}{fraction:.9g}"):
    yield


@dataclasses.dataclass(frozen=True)
class Count:
  """FLOPs of a program: all it runs, and the model FLOPs among them."""
  computed: float
  required: float

  def __add__(self, other: "Count") -> "Count":
    return Count(self.computed + other.computed,
                 self.required + other.required)

  def __mul__(self, times: float) -> "Count":
    return Count(self.computed * times, self.required * times)


def _product_flops(eqn) -> int:
  """2 × multiply-adds of a dot_general or ragged_dot equation (0 for
  anything else)."""
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params[
        "dimension_numbers"]
    contract = math.prod(lhs[d] for d in lhs_contract)
    batch = math.prod(lhs[d] for d in lhs_batch)
    lhs_free = math.prod(lhs) // (contract * batch)
    rhs_free = math.prod(rhs) // (contract * batch)
    return 2 * batch * lhs_free * rhs_free * contract
  if name in ("ragged_dot", "ragged_dot_general"):
    # Each row meets its own group's weights only: rows × in × out.
    return 2 * math.prod(eqn.invars[0].aval.shape) * (
        eqn.outvars[0].aval.shape[-1])
  return 0


def _share(eqn) -> float:
  """The share of an equation's products that the model requires."""
  stack = str(eqn.source_info.name_stack)
  if _REMAT in stack:
    return 0.0
  return math.prod(float(s) for s in _SHARE.findall(stack))


def _sub_programs(eqn):
  """The jaxprs inside an equation's parameters."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def _count_jaxpr(jaxpr) -> Count:
  total = Count(0.0, 0.0)
  for eqn in jaxpr.eqns:
    flops = _product_flops(eqn)
    total += Count(flops, flops * _share(eqn))
    inner = [_count_jaxpr(sub) for sub in _sub_programs(eqn)]
    if eqn.primitive.name == "cond":  # One branch runs.
      total += max(inner, key=lambda c: c.computed)
    else:
      times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      total += sum(inner, Count(0.0, 0.0)) * times
  return total


def count(fn, *args, **kwargs) -> Count:
  """FLOPs of `fn(*args, **kwargs)`, traced on abstract values (arrays or
  jax.ShapeDtypeStruct); nothing is computed."""
  jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
  # What no output depends on, XLA removes too (e.g. the gradient of a
  # frozen input of a single layer).
  jaxpr, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return _count_jaxpr(jaxpr)
