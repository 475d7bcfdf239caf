"""Reads .safetensors files into numpy, lazily and without torch.

The format is an 8-byte little-endian header size, a JSON header mapping
each tensor name to its dtype, shape and byte range, then the raw bytes.
Reading it directly (through a memory map) avoids a torch dependency and
handles bfloat16, which `safetensors.numpy` cannot return as numpy.
Sharded checkpoints list their files in `model.safetensors.index.json`.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_file(path: str) -> dict[str, np.ndarray]:
  """name -> array (read-only views of a memory map) of one file."""
  with open(path, "rb") as f:
    header_size = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(header_size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, "
                       f"which is not supported ({sorted(_DTYPES)}).")
    start, end = info["data_offsets"]
    arrays[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(
        info["shape"])
  return arrays


def read_checkpoint(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face checkpoint directory, sharded or not."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(directory)
                   if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(
        f"{directory}: no model.safetensors (or index of shards) found.")
  arrays = {}
  for name in files:
    arrays.update(read_file(os.path.join(directory, name)))
  return arrays

