"""What one train row holds: one example, or several packed examples.

`config.data.packing` decides (docs/data.md, "Packing"). The data pipeline
(building rows), the trainer (counting their tokens and FLOPs) and
`omnismola.aot` (compiling for their shapes) all read it from here, which
imports neither TensorFlow nor JAX.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """A train row: `images` image slots and `text_length` text tokens;
  `packed` rows carry `segment_ids` and images [M, H, W, 3]."""
  images: int
  text_length: int
  window: int
  packed: bool


def row_layout(data_config) -> RowLayout:
  """The row layout of `config.data` (its fields checked by schema.py)."""
  example_length = sum(data_config.feature_lengths.values())
  packing = data_config.packing
  if packing.examples <= 1:
    return RowLayout(images=1, text_length=example_length, window=1,
                     packed=False)
  return RowLayout(images=packing.examples,
                   text_length=packing.text_length or example_length,
                   window=packing.window, packed=True)


def batch_shapes(layout: RowLayout, batch: int,
                 image_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """{key: (shape, dtype name)} of a train batch of `batch` rows."""
  text = ((batch, layout.text_length), "int32")
  shapes = dict(text=text, mask_ar=text, mask_loss=text, mask_input=text)
  if layout.packed:
    shapes["segment_ids"] = text
  # One image and task per example: M per packed row.
  examples = (batch, layout.images) if layout.packed else (batch,)
  shapes.update(image=(examples + (image_size, image_size, 3), "float32"),
                task_id=(examples, "int32"))
  return shapes
