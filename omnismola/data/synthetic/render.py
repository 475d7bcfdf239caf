"""A small deterministic renderer for synthetic images, in pure numpy.

Images are uint8 [64, 64, 3]. Everything is drawn on the 8x8 grid of 8x8-pixel
cells that matches the patch grid of the default ViT (8x8 patches), so a glyph
fills exactly one patch and a shape fills whole patches: a tiny model then
reads one glyph or one shape part per token instead of having to untangle
objects that straddle patch borders.

The 5x7 font is our own (drawn below), so no font file or library is needed
and every machine renders identical pixels.
"""
import functools

import numpy as np

IMAGE_SIZE = 64
CELL = 8  # Pixels per grid cell; equal to the ViT patch size.
GRID = IMAGE_SIZE // CELL  # Cells per side.

BACKGROUND = (16, 16, 16)
INK = (240, 240, 240)

# Colour names have at most 4 letters so that two-object captions ("gold
# triangle and pink triangle") fit the 32-token suffix; the RGB values are far
# apart so a linear patch embedding separates them easily.
COLORS = {
    "red": (230, 40, 40),
    "blue": (50, 90, 255),
    "gold": (240, 200, 30),
    "pink": (255, 120, 210),
    "cyan": (40, 220, 230),
    "gray": (135, 135, 135),
}
SHAPES = ("circle", "square", "triangle")

# Our 5x7 font: 7 rows of 5 pixels per glyph, "#" = ink.
_GLYPHS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# ##..# #.#.# #..## #...# #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
FONT = {ch: np.array([[p == "#" for p in row] for row in rows.split()])
        for ch, rows in _GLYPHS.items()}


def blank() -> np.ndarray:
  """An empty canvas."""
  return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, np.uint8)


def draw_text(image: np.ndarray, text: str, row: int, col: int,
              color=INK) -> None:
  """Draws `text` in place, one glyph per cell, starting at cell (row, col).

  The 5x7 glyph sits 1 pixel in from the cell's top-left corner, so adjacent
  glyphs are separated by blank pixels inside their own cells.
  """
  if not 0 <= row < GRID or col < 0 or col + len(text) > GRID:
    raise ValueError(f"{text!r} at cell ({row}, {col}) leaves the "
                     f"{GRID}x{GRID} grid.")
  for i, ch in enumerate(text):
    if ch == " ":
      continue
    if ch not in FONT:
      raise ValueError(f"No glyph for {ch!r}; the font has "
                       f"{''.join(sorted(FONT))}.")
    y, x = row * CELL + 1, (col + i) * CELL + 1
    image[y:y + 7, x:x + 5][FONT[ch]] = color


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
  """bool [size, size]: a filled shape with a 1-pixel margin on every side;
  read-only (cached), so callers only ever index with it."""
  centre, radius = (size - 1) / 2, size / 2 - 1
  ys, xs = np.mgrid[:size, :size]
  inner = (ys >= 1) & (ys <= size - 2) & (xs >= 1) & (xs <= size - 2)
  if shape == "circle":
    mask = (ys - centre) ** 2 + (xs - centre) ** 2 <= radius ** 2
  elif shape == "square":
    mask = inner
  elif shape == "triangle":
    # Apex at the top centre, base on the bottom row of the margin box.
    mask = inner & (np.abs(xs - centre) <= (ys - 1) / 2 + 0.5)
  else:
    raise ValueError(f"Unknown shape {shape!r}; shapes: {SHAPES}.")
  mask.setflags(write=False)
  return mask


def draw_shape(image: np.ndarray, shape: str, color: str, row: int, col: int,
               cells: int = 2) -> None:
  """Draws a filled shape in place over cells [row, row+cells) x [col, ...)."""
  if not (0 <= row <= GRID - cells and 0 <= col <= GRID - cells):
    raise ValueError(f"A {cells}-cell shape at cell ({row}, {col}) leaves the "
                     f"{GRID}x{GRID} grid.")
  size = cells * CELL
  y, x = row * CELL, col * CELL
  image[y:y + size, x:x + size][shape_mask(shape, size)] = COLORS[color]


def bar_chart(heights, colors, columns, unit: int = 7) -> np.ndarray:
  """A bar chart: bar i is `heights[i] * unit` pixels tall in grid column i.

  Bars stand on the bottom edge and are 6 pixels wide inside their column's
  cells, so each bar lies in one column of patches and its top edge's
  position inside a patch encodes the height exactly.
  """
  if max(heights) * unit > IMAGE_SIZE:
    raise ValueError(f"Bars of height {max(heights)} x {unit} px do not fit.")
  image = blank()
  for height, color, column in zip(heights, colors, columns):
    x = column * CELL + 1
    image[IMAGE_SIZE - height * unit:, x:x + CELL - 2] = COLORS[color]
  return image


def form(lines, rows) -> np.ndarray:
  """A key-value form: `lines[i]` ("AGE 42") at the left of grid row rows[i]."""
  image = blank()
  for line, row in zip(lines, rows):
    draw_text(image, line, row, 0)
  return image
