"""The synthetic suite: deterministic, rendered on the patch grid, and every
answer read back from the pixels agrees with the example's target."""
import collections

import numpy as np
import pytest

from omnismola.data.synthetic import render
from omnismola.data.synthetic import scenes

N = 150  # Examples checked per task and split.


def _ink(pixels: np.ndarray) -> np.ndarray:
  return np.any(pixels != render.BACKGROUND, axis=-1)


def read_shapes(image: np.ndarray) -> list[tuple[str, str, tuple[int, int]]]:
  """[(shape, colour, (block_row, block_col))] found in the 4x4 block grid.

  Every non-empty block must hold exactly one shape template in one colour,
  which also checks that shapes stay inside their 2x2 patches.
  """
  found = []
  size = render.CELL * scenes.BLOCK
  for row in range(scenes.BLOCKS):
    for col in range(scenes.BLOCKS):
      block = image[row * size:(row + 1) * size, col * size:(col + 1) * size]
      ink = _ink(block)
      if not ink.any():
        continue
      shapes = [s for s in render.SHAPES
                if np.array_equal(ink, render.shape_mask(s, size))]
      colors = [c for c, rgb in render.COLORS.items()
                if np.all(block[ink] == rgb)]
      assert len(shapes) == 1 and len(colors) == 1, (row, col)
      found.append((shapes[0], colors[0], (row, col)))
  return found


def read_text(image: np.ndarray) -> list[str]:
  """The text of each grid row, read glyph by glyph with the font."""
  lines = []
  for row in range(render.GRID):
    chars = []
    for col in range(render.GRID):
      cell = _ink(image[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8])
      if not cell.any():
        chars.append(" ")
        continue
      # The glyph stays in its cell: 1 blank pixel above and left, 2 right.
      assert not (cell[0].any() or cell[:, 0].any() or cell[:, 6:].any())
      matches = [ch for ch, glyph in render.FONT.items()
                 if np.array_equal(cell[1:, 1:6], glyph)]
      assert len(matches) == 1, (row, col)
      chars.append(matches[0])
    lines.append("".join(chars).rstrip())
  return lines


def read_bars(image: np.ndarray) -> dict[str, int]:
  """{colour: value} of a bar chart: bar height in pixels / 7 per unit."""
  bars = {}
  for col in range(render.GRID):
    column = image[:, col * 8 + 1]
    if not _ink(column[-1:]).any():
      assert not _ink(image[:, col * 8:(col + 1) * 8]).any()
      continue
    color = [c for c, rgb in render.COLORS.items() if np.all(column[-1] == rgb)]
    height = int(_ink(column).sum())
    assert height % 7 == 0 and len(color) == 1
    bars[color[0]] = height // 7
  return bars


def _examples(task, split="train", n=N):
  return [scenes.make_example(task, split, i) for i in range(n)]


@pytest.mark.parametrize("task", scenes.TASKS)
def test_examples_are_deterministic_and_well_formed(task):
  a, b = (scenes.make_example(task, "train", 7) for _ in range(2))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert (a["prefix"], a["suffix"], a["references"]) == (
      b["prefix"], b["suffix"], b["references"])
  train, validation = _examples(task), _examples(task, "validation")
  # Index and split both seed the example (small scene spaces do repeat).
  differ = lambda x, y: not np.array_equal(x["image"], y["image"])
  assert np.mean([differ(t, v) for t, v in zip(train, validation)]) > 0.9
  assert np.mean([differ(t, u) for t, u in zip(train, train[1:])]) > 0.9
  examples = train + validation
  for e in examples:
    assert e["image"].shape == (64, 64, 3) and e["image"].dtype == np.uint8
    assert _ink(e["image"]).any()
    assert len(e["prefix"].encode()) <= 48 and len(e["suffix"].encode()) <= 31
    assert e["suffix"] in e["references"] or task == "vqa"
  # Targets vary (a constant target would be learnable blind).
  assert len({e["suffix"] for e in examples}) >= 3


def test_unknown_task_or_split_fails():
  with pytest.raises(ValueError, match="Unknown synthetic task"):
    scenes.make_example("nope", "train", 0)
  with pytest.raises(ValueError, match="Unknown split"):
    scenes.make_example("ocr", "test", 0)


def test_font_and_shapes_are_distinct_and_stay_in_their_cells():
  glyphs = {g.tobytes() for g in render.FONT.values()}
  assert len(glyphs) == len(render.FONT)
  masks = [render.shape_mask(s, 16) for s in render.SHAPES]
  assert len({m.tobytes() for m in masks}) == 3
  for mask in masks:
    assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any()
                or mask[:, -1].any())  # 1-pixel margin on every side.
    np.testing.assert_array_equal(mask, mask[:, ::-1])  # Left-right symmetric.
  circle, square, triangle = masks
  assert circle.sum() < square.sum() and triangle.sum() < circle.sum()
  widths = triangle.sum(axis=1)[1:-1]
  assert np.all(np.diff(widths) >= 0) and widths[0] < widths[-1]
  with pytest.raises(ValueError, match="leaves the"):
    render.draw_text(render.blank(), "TOOLONGWORD", 0, 0)
  with pytest.raises(ValueError, match="No glyph"):
    render.draw_text(render.blank(), "a", 0, 0)


def test_captions_name_the_drawn_shapes_in_reading_order():
  counts = collections.Counter()
  for e in _examples("captioning"):
    objects = read_shapes(e["image"])
    counts[len(objects)] += 1
    names = [f"{color} {shape}" for shape, color, _ in objects]
    if len(names) == 2 and names[0] == names[1]:
      assert e["suffix"] == f"two {names[0]}s"
    else:
      assert e["suffix"] == " and ".join(names)
    assert len(e["references"]) == 5 and len(set(e["references"])) == 5
  assert set(counts) == {1, 2}


def test_vqa_answers_agree_with_the_scene():
  kinds = collections.Counter()
  place_of = {block: place for place, blocks in scenes.POSITIONS.items()
              for block in blocks}
  for e in _examples("vqa"):
    objects = read_shapes(e["image"])
    question = e["prefix"].removeprefix("answer en ")
    words = question.rstrip("?").split()
    if question.startswith("what color is the"):
      matches = [c for s, c, _ in objects if s == words[-1]]
      assert matches == [e["suffix"]]
    elif question.startswith("where is the"):
      color, shape = words[-2:]
      blocks = [b for s, c, b in objects if (s, c) == (shape, color)]
      assert len(blocks) == 1 and place_of[blocks[0]] == e["suffix"]
    else:
      color, shape = words[-2:]
      present = any((s, c) == (shape, color) for s, c, _ in objects)
      assert e["suffix"] == ("yes" if present else "no")
    kinds[words[0], e["suffix"] if words[0] == "is" else ""] += 1
    # Ten annotators, most of whom give the target answer.
    assert len(e["references"]) == 10
    assert e["references"].count(e["suffix"]) >= 5
  assert kinds["what", ""] and kinds["where", ""]
  assert kinds["is", "yes"] > 10 and kinds["is", "no"] > 10


def test_count_answers_equal_the_drawn_targets():
  answers = set()
  for e in _examples("counting"):
    target = e["prefix"].split("how many ")[1].split("s are")[0]
    objects = read_shapes(e["image"])
    assert e["suffix"] == str(sum(s == target for s, _, _ in objects))
    answers.add(e["suffix"])
  assert answers == {str(n) for n in range(1, 8)}


def test_ocr_target_is_the_rendered_word():
  for e in _examples("ocr"):
    lines = [line.strip() for line in read_text(e["image"]) if line.strip()]
    assert lines == [e["suffix"]] and e["suffix"] in scenes.WORDS


def test_chart_answers_agree_with_the_bar_heights():
  for e in _examples("chartqa"):
    bars = read_bars(e["image"])
    assert 3 <= len(bars) <= 5 and all(1 <= v <= 9 for v in bars.values())
    question = e["prefix"].removeprefix("answer en ")
    if "tallest" in question:
      assert e["suffix"] == max(bars, key=bars.get)
      assert sorted(bars.values())[-2] < bars[e["suffix"]]  # Unique.
    elif "shortest" in question:
      assert e["suffix"] == min(bars, key=bars.get)
      assert sorted(bars.values())[1] > bars[e["suffix"]]
    else:
      color = question.split("the value of the ")[1].split()[0]
      assert e["suffix"] == str(bars[color])


def test_form_answers_are_the_values_written_next_to_the_key():
  for e in _examples("docqa"):
    fields = dict(line.split(" ", 1) for line in read_text(e["image"])
                  if line)
    assert 2 <= len(fields) <= 4 and set(fields) <= set(scenes.FORM_FIELDS)
    key = e["prefix"].split("what is the ")[1].rstrip("?").upper()
    assert fields[key] == e["suffix"]
