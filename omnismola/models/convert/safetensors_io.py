"""Reads .safetensors files into numpy, lazily and without torch.

The format is an 8-byte little-endian header size, a JSON header mapping
each tensor name to its dtype, shape and byte range, then the raw bytes.
Reading it directly (through a memory map; a storage URL's file into
memory) handles bfloat16, which `safetensors.numpy` cannot return.
"""
import json
import struct

import ml_dtypes
import numpy as np

from omnismola import storage

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# Real headers are kilobytes; the first 8 bytes of a garbled file would
# usually ask for exabytes.
_MAX_HEADER_BYTES = 100 * 2**20


def _read_header(f, path) -> tuple[int, dict]:
  """(size, JSON header) of an open .safetensors file."""
  start = f.read(8)
  size = struct.unpack("<Q", start)[0] if len(start) == 8 else 0
  try:
    header = json.loads(f.read(size)) if 0 < size <= _MAX_HEADER_BYTES else 0
  except ValueError:  # Not JSON, or not UTF-8.
    header = 0
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a safetensors file: its header is "
                     "garbled.")
  return size, header


def read_file(path) -> dict[str, np.ndarray]:
  """name -> array (read-only views of a memory map, or of the bytes read
  for a storage URL) of one file."""
  path = storage.path(path)
  with path.open("rb") as f:
    header_size, header = _read_header(f, path)
    data = (np.frombuffer(f.read(), np.uint8) if storage.is_url(path) else
            np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size))
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


def read_checkpoint(directory) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face checkpoint directory, sharded or not."""
  directory = storage.path(directory)
  index = directory / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    files = sorted(p.name for p in directory.iterdir()
                   if p.name.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(
        f"{directory}: no model.safetensors (or index of shards) found.")
  arrays = {}
  for name in files:
    arrays.update(read_file(directory / name))
  return arrays

