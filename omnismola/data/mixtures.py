"""SeqIO mixtures of the registered tasks, and what a mixture is made of.

A task's rate is either a number (explicit rates) or
`examples_proportional(temperature=T, maximum=M)`: min(train examples, M)
** (1 / T), T5's examples-proportional mixing, computed from the built data
when training starts (T = 1 is proportional, larger T flattens towards equal
rates, M keeps huge datasets from drowning the rest); docs/data.md has
examples of both.
"""
import functools
from typing import Callable, Sequence

import seqio

from omnismola import errors

# Imported to register the tasks the mixtures name.
from omnismola.data import tasks  # pylint: disable=unused-import
from omnismola.data.benchmarks import suite
from omnismola.data.synthetic import scenes

Rate = float | Callable[[seqio.Task], float]

SYNTHETIC_MIX = "synthetic_mix"
# The synthetic tasks in two skill groups (e.g. to pretrain one vision
# encoder on each): seeing shapes and colours, and reading rendered text.
SYNTHETIC_GROUPS = {
    "synthetic_scene_mix": ("captioning", "vqa", "counting"),
    "synthetic_reading_mix": ("ocr", "chartqa", "docqa"),
}
# Every real benchmark, examples-proportional with temperature 2, each task
# counting at most 100k train examples (VQAv2 and OCR-VQA have far more).
BENCHMARKS_MIX = "benchmarks_mix"


def examples_proportional(*, temperature: float = 1.0,
                          maximum: int | None = None) -> Rate:
  """A rate computed from a task's number of train examples (see above)."""
  return functools.partial(seqio.mixing_rate_num_examples,
                           temperature=temperature, maximum=maximum)


def register_mixture(name: str,
                     tasks_and_rates: Sequence[tuple[str, Rate]]
                     ) -> seqio.Mixture:
  """Registers (or replaces, for notebooks) mixture `name`."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


def task_names(name: str) -> list[str]:
  """The tasks of mixture (or task) `name`; an index here is a task_id.
  Needs no data (rates from example counts are not evaluated)."""
  if name in seqio.TaskRegistry.names():
    return [name]
  if name not in seqio.MixtureRegistry.names():
    raise errors.InputError(
        f"{name!r} is neither a registered SeqIO mixture nor a task. "
        f"Mixtures: {sorted(seqio.MixtureRegistry.names())}; tasks: "
        f"{sorted(seqio.TaskRegistry.names())}. Register your own in a module "
        "named in config.data.task_modules, or name a folder of JSON-lines "
        "files in config.data.jsonl (docs/data.md).")
  # SeqIO keeps a mixture's tasks sorted by name.
  return [task.name for task in seqio.get_mixture_or_task(name).tasks]


def mixture_tasks(name: str) -> list[tuple[str, float]]:
  """[(task name, rate)] of mixture `name`; [(name, 1.0)] for a plain task.
  Rates from example counts read the built data (`pipeline.prepare` first).
  """
  names = task_names(name)
  if names == [name]:
    return [(name, 1.0)]
  mixture = seqio.get_mixture_or_task(name)
  return [(task.name, float(mixture.get_rate(task)))
          for task in mixture.tasks]


for _name, _group in {SYNTHETIC_MIX: scenes.TASKS, **SYNTHETIC_GROUPS}.items():
  register_mixture(_name, [(f"synthetic_{t}", 1.0) for t in _group])
register_mixture(BENCHMARKS_MIX, [
    (task, examples_proportional(temperature=2.0, maximum=100_000))
    for task in suite.TASKS])
