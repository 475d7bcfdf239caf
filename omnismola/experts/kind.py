"""What an expert kind declares so that configs can attach it.

A module of this package that defines `KIND = Kind(...)` is an expert kind:
`config.experts` entries name it by `Kind.name`, and experts/attach.py finds
it there. A new kind is one new module.
"""
import dataclasses
from typing import Callable

from flax import nnx

# The sorts of module experts attach to, as error messages name them.
LINEAR = "linear layer"
BLOCK = "MLP block"


@dataclasses.dataclass(frozen=True)
class Kind:
  """How an expert kind attaches.

  Attributes:
    name: what `config.experts` entries call it (`kind='lora'`).
    cls: the kind's module.
    attaches_to: the sorts of module (LINEAR, BLOCK) it attaches to.
    replaces: False for an adapter beside the module, True for a
      replacement of the MLP block (how each is built and called:
      docs/experts.md, "Adding an expert kind").
    routed: the adapter also takes `instance_features` and
      `share_in_block` (see sparse_lora.py).
  """
  name: str
  cls: Callable[..., nnx.Module]
  attaches_to: tuple[str, ...]
  replaces: bool = False
  routed: bool = False
