"""The synthetic tasks: one example generator per task, mirroring the papers'
benchmark suite at toy scale (docs/data.md shows an example of each).

`make_example(task, split, index)` is a pure function: it draws everything
from `np.random.default_rng([task_seed, split_id, index])`, so any example can
be regenerated alone (in tests) and every machine builds the same data.

Every suffix is at most MAX_SUFFIX_BYTES bytes so that with its EOS it fits a
32-token suffix, and every prefix fits 48 tokens: the default
feature_lengths (prefix=48, suffix=32) never truncate the built-in suite.
"""
import zlib

import numpy as np

from omnismola.data.synthetic import render

TASKS = ("captioning", "vqa", "counting", "ocr", "chartqa", "docqa")
# Each task's metric (a key of omnismola.eval.metrics.METRICS).
METRICS = {
    "captioning": "cider",
    "vqa": "vqa_accuracy",
    "counting": "exact_match",
    "ocr": "exact_match",
    "chartqa": "relaxed_accuracy",
    "docqa": "anls",
}
SPLITS = ("train", "validation")
MAX_PREFIX_BYTES = 48
MAX_SUFFIX_BYTES = 31  # + EOS = 32 tokens.

COLORS = tuple(render.COLORS)
SHAPES = render.SHAPES

# 2x2-cell blocks: the image is a 4x4 grid of blocks, one shape per block.
BLOCK = 2
BLOCKS = render.GRID // BLOCK

# VQA positions: each answer owns two blocks on one edge of the block grid, so
# the answer is unambiguous whichever of the two the object sits in.
POSITIONS = {
    "top": ((0, 1), (0, 2)),
    "bottom": ((3, 1), (3, 2)),
    "left": ((1, 0), (2, 0)),
    "right": ((1, 3), (2, 3)),
}
# What a careless annotator may write instead (VQA references only).
VQA_VARIANTS = {
    "gray": ("grey",), "gold": ("yellow",), "cyan": ("light blue",),
    "pink": ("magenta",), "top": ("up",), "bottom": ("down",),
}
VQA_NOISE = 0.1  # Probability that an annotator's answer is a variant.

WORDS = tuple("""
    ACT AIR ANT ARM ART BAG BED BOX BUS CAR CAT COW CUP DAY DOG EAR EGG EYE
    FAN FOX GAS HAT ICE INK JAR JET KEY LEG MAP MUD NET OAK OWL PEN PIG RAT
    RUG SEA SKY SUN TEA TOY VAN WEB ZOO BELL BIRD BOAT BONE BOOK CAKE CLAY
    COIN CORN DESK DOOR DUCK FARM FISH FLAG FROG GATE GIFT GOAT HILL HORN
    IRON KITE LAKE LAMP LEAF LION MILK MOON NEST NOSE OVEN PARK PEAR RAIN
    ROAD ROSE SALT SHIP SNOW SOAP STAR TENT TREE VASE WAVE WIND WOLF YARN
    APPLE BEACH BREAD BRUSH CHAIR CLOCK CLOUD CROWN DRESS EAGLE FENCE FLAME
    GHOST GRAPE HEART HORSE HOUSE JUICE KNIFE LEMON MANGO MOUSE MUSIC NIGHT
    OCEAN PAPER PIANO PLANT QUEEN RIVER ROBOT SHEEP SNAKE SPOON STONE SUGAR
    TABLE TIGER TOWER TRAIN WATER WHEEL ZEBRA BASKET BRIDGE CAMERA CANDLE
    CASTLE CIRCLE DRAGON FOREST GARDEN GUITAR HAMMER ISLAND JACKET LADDER
    MIRROR ORANGE PENCIL POCKET RABBIT ROCKET SCHOOL SPIDER TOMATO WINDOW
    BALLOON BLANKET CHICKEN DIAMOND DOLPHIN KITCHEN LIBRARY MONSTER PRINTER
    RAINBOW TEACHER VOLCANO ELEPHANT MOUNTAIN SANDWICH UMBRELLA
""".split())

# Form fields; every "KEY VALUE" line fits the 8 cells of a grid row.
_NAMES = tuple("ADA AMY ANN BEN BOB DAN EVA EVE GUS IDA IAN JOE KIM LEO LIZ "
               "MAX MIA NED SAM TED TIM TOM UMA ZOE".split())
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # No I, O, Q: they read like 1, 0, 0.
FORM_FIELDS = {
    "NAME": lambda rng: str(rng.choice(_NAMES)),
    "AGE": lambda rng: str(rng.integers(10, 100)),
    "ZIP": lambda rng: str(rng.integers(1000, 10_000)),
    "ROOM": lambda rng: str(rng.integers(1, 1000)),
    "DAY": lambda rng: str(rng.choice("MON TUE WED THU FRI SAT SUN".split())),
    "SIZE": lambda rng: str(rng.choice(("XS", "S", "M", "L", "XL"))),
    "CODE": lambda rng: (str(rng.choice(list(_LETTERS))) +
                         str(rng.integers(10)) +
                         str(rng.choice(list(_LETTERS)))),
}


def _blocks(rng, count: int) -> list[tuple[int, int]]:
  """`count` distinct (row, col) blocks of the 4x4 block grid."""
  flat = rng.choice(BLOCKS * BLOCKS, size=count, replace=False)
  return [divmod(int(i), BLOCKS) for i in flat]


def _draw_objects(objects) -> np.ndarray:
  """objects: [(shape, color, (block_row, block_col))] -> image."""
  image = render.blank()
  for shape, color, (row, col) in objects:
    render.draw_shape(image, shape, color, row * BLOCK, col * BLOCK, BLOCK)
  return image


def _captioning(rng):
  count = int(rng.integers(1, 3))
  # Distinct blocks; sorted so the caption names objects in reading order,
  # which makes the target a function of the image.
  blocks = sorted(_blocks(rng, count))
  objects = [(str(rng.choice(SHAPES)), str(rng.choice(COLORS)), b)
             for b in blocks]
  names = [f"{color} {shape}" for shape, color, _ in objects]
  # No articles in the target (it must fit 31 bytes); the references carry
  # the fuller phrasings annotators would write.
  if count == 1:
    caption = names[0]
    references = [caption, f"a {caption}", f"there is a {caption}",
                  f"one {caption}", f"a single {caption}"]
  elif names[0] == names[1]:
    shape, color, _ = objects[0]
    caption = f"two {color} {shape}s"
    references = [caption, f"there are two {color} {shape}s",
                  f"a pair of {color} {shape}s",
                  f"a {color} {shape} and another {color} {shape}",
                  f"two {shape}s that are {color}"]
  else:
    caption = " and ".join(names)
    first, second = (f"a {n}" for n in names)
    references = [caption, f"{first} and {second}",
                  f"there is {first} and {second}", f"{second} and {first}",
                  f"{first} next to {second}"]
  return _draw_objects(objects), "caption en", caption, references


def _annotators(rng, answer: str, alternatives) -> list[str]:
  """Ten human answers: mostly `answer`, some variants or mistakes."""
  noise = list(VQA_VARIANTS.get(answer, ())) + [a for a in alternatives
                                                 if a != answer]
  return [str(rng.choice(noise)) if rng.random() < VQA_NOISE else answer
          for _ in range(10)]


def _vqa(rng):
  count = int(rng.integers(1, 4))
  places = [str(p) for p in rng.choice(list(POSITIONS), size=count,
                                       replace=False)]
  # Distinct (shape, colour) pairs, so "the blue circle" names one object.
  pairs = rng.choice(len(SHAPES) * len(COLORS), size=count, replace=False)
  objects = [(SHAPES[pair // len(COLORS)], COLORS[pair % len(COLORS)],
              POSITIONS[place][int(rng.integers(2))], place)
             for place, pair in zip(places, pairs)]
  image = _draw_objects([o[:3] for o in objects])

  kind = str(rng.choice(("color", "where", "exists")))
  shapes = [o[0] for o in objects]
  unique_shape = [o for o in objects if shapes.count(o[0]) == 1]
  if kind == "color" and unique_shape:
    shape, color, _, _ = unique_shape[int(rng.integers(len(unique_shape)))]
    question, answer, answers = f"what color is the {shape}?", color, COLORS
  elif kind in ("color", "where"):
    shape, color, _, place = objects[int(rng.integers(count))]
    question, answer, answers = (f"where is the {color} {shape}?", place,
                                 tuple(POSITIONS))
  else:
    if rng.random() < 0.5:
      shape, color, _, _ = objects[int(rng.integers(count))]
    else:
      absent = sorted(set((s, c) for s in SHAPES for c in COLORS) -
                      set((o[0], o[1]) for o in objects))
      shape, color = absent[int(rng.integers(len(absent)))]
    present = any(o[0] == shape and o[1] == color for o in objects)
    question, answer, answers = (f"is there a {color} {shape}?",
                                 "yes" if present else "no", ("yes", "no"))
  return (image, f"answer en {question}", answer,
          _annotators(rng, answer, answers))


def _counting(rng):
  target = str(rng.choice(SHAPES))
  count = int(rng.integers(1, 8))
  others = int(rng.integers(0, 5))
  distractors = [s for s in SHAPES if s != target]
  objects = [(target if i < count else str(rng.choice(distractors)),
              str(rng.choice(COLORS)), block)
             for i, block in enumerate(_blocks(rng, count + others))]
  answer = str(count)
  return (_draw_objects(objects), f"answer en how many {target}s are there?",
          answer, [answer])


def _ocr(rng):
  word = str(rng.choice(WORDS))
  row = int(rng.integers(render.GRID))
  col = int(rng.integers(render.GRID - len(word) + 1))
  ink = render.COLORS[str(rng.choice(COLORS))] if rng.random() < 0.5 else \
      render.INK
  image = render.blank()
  render.draw_text(image, word, row, col, ink)
  return image, "ocr", word, [word]


def _chartqa(rng):
  count = int(rng.integers(3, 6))
  colors = [str(c) for c in rng.choice(COLORS, size=count, replace=False)]
  columns = np.sort(rng.choice(render.GRID, size=count, replace=False))
  # Redraw until the tallest and the shortest bar are unique, so "which bar"
  # questions have one answer.
  while True:
    heights = rng.integers(1, 10, size=count)
    if (np.sum(heights == heights.max()) == 1 and
        np.sum(heights == heights.min()) == 1):
      break
  image = render.bar_chart(heights, colors, columns)
  kind = rng.random()
  if kind < 0.6:
    i = int(rng.integers(count))
    question, answer = (f"what is the value of the {colors[i]} bar?",
                        str(heights[i]))
  elif kind < 0.8:
    question, answer = "which bar is the tallest?", colors[np.argmax(heights)]
  else:
    question, answer = "which bar is the shortest?", colors[np.argmin(heights)]
  return image, f"answer en {question}", answer, [answer]


def _docqa(rng):
  count = int(rng.integers(2, 5))
  keys = [str(k) for k in rng.choice(list(FORM_FIELDS), size=count,
                                     replace=False)]
  values = [FORM_FIELDS[k](rng) for k in keys]
  rows = np.sort(rng.choice(render.GRID, size=count, replace=False))
  image = render.form([f"{k} {v}" for k, v in zip(keys, values)], rows)
  i = int(rng.integers(count))
  return (image, f"answer en what is the {keys[i].lower()}?", values[i],
          [values[i]])


_GENERATORS = {
    "captioning": _captioning, "vqa": _vqa, "counting": _counting,
    "ocr": _ocr, "chartqa": _chartqa, "docqa": _docqa,
}


def task_seed(task: str) -> int:
  """A stable per-task seed (Python's hash() is salted per process)."""
  return zlib.crc32(task.encode("utf-8"))


def make_example(task: str, split: str, index: int) -> dict:
  """Example `index` of `split` of `task`: dict(image=uint8 [64, 64, 3],
  prefix, suffix (the target), references (every answer the metric accepts)).
  """
  if task not in _GENERATORS:
    raise ValueError(f"Unknown synthetic task {task!r}; tasks: {TASKS}.")
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; splits: {SPLITS}.")
  rng = np.random.default_rng([task_seed(task), SPLITS.index(split), index])
  image, prefix, suffix, references = _GENERATORS[task](rng)
  # Guards the length budget documented above for every generated example.
  if (len(prefix.encode()) > MAX_PREFIX_BYTES or
      len(suffix.encode()) > MAX_SUFFIX_BYTES):
    raise AssertionError(f"{task}: {prefix!r} -> {suffix!r} exceeds the "
                         "length budget.")
  return dict(image=image, prefix=prefix, suffix=suffix,
              references=list(references))
