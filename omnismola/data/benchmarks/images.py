"""Reading the images of the real datasets: one place for decoding and sizing.

Every builder stores each image through `load_image`: EXIF orientation
applied (phone photos in TextVQA and VQA are often stored rotated), RGB, and
the longer side capped at MAX_SIDE, which keeps the built data small; the
pipeline resizes to `config.data.image_size` when it reads.
"""
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps

# PaliGemma's largest resolution.
MAX_SIDE = 896

# ((left, top), (right, bottom)) and the text to write there.
Label = tuple[tuple[tuple[int, int], tuple[int, int]], str]


def draw_labels(image: Image.Image, labels: Sequence[Label]) -> Image.Image:
  """Blanks each box and writes its text: AI2D's letter questions ("what is
  A in the diagram?") are about images that still show the words."""
  image = image.copy()
  draw = ImageDraw.Draw(image)
  for (top_left, bottom_right), text in labels:
    draw.rectangle([tuple(top_left), tuple(bottom_right)], fill="white")
    height = max(8, bottom_right[1] - top_left[1])
    draw.text(tuple(top_left), text, fill="black",
              font=ImageFont.load_default(size=height))
  return image


def load_image(path: epath.PathLike, *, example: str,
               labels: Sequence[Label] = ()) -> np.ndarray:
  """The image at `path` as uint8 [H, W, 3], longer side <= MAX_SIDE, with
  `labels` drawn (draw_labels). A missing file (FileNotFoundError) or one PIL
  cannot decode (ValueError) is named with `example`, so that a broken file
  among a million can be found."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Example {example}: image {path} does not exist.")
  try:
    with path.open("rb") as f:
      image = Image.open(f)
      image.load()
  except (OSError, SyntaxError, ValueError) as e:  # PIL's decode errors.
    raise ValueError(f"Example {example}: cannot decode image {path}: "
                     f"{e}") from e
  image = ImageOps.exif_transpose(image).convert("RGB")
  if labels:
    image = draw_labels(image, labels)
  image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
  return np.asarray(image)
