"""SeqIO mixtures of the registered tasks, and what a mixture is made of."""
import seqio

# Imported to register the tasks the mixtures name.
from omnismola.data import tasks  # pylint: disable=unused-import
from omnismola.data.synthetic import scenes

SYNTHETIC_MIX = "synthetic_mix"

# Every built-in task at the same rate.
if SYNTHETIC_MIX not in seqio.MixtureRegistry.names():
  seqio.MixtureRegistry.add(
      SYNTHETIC_MIX, [(f"synthetic_{t}", 1.0) for t in scenes.TASKS])


def mixture_tasks(name: str) -> list[tuple[str, float]]:
  """[(task name, rate)] of mixture `name`; [(name, 1.0)] for a plain task.

  SeqIO keeps a mixture's tasks sorted by name; a task's index in this list
  is the `task_id` its examples carry.
  """
  if name in seqio.TaskRegistry.names():
    return [(name, 1.0)]
  if name not in seqio.MixtureRegistry.names():
    raise ValueError(
        f"{name!r} is neither a registered SeqIO mixture nor a task. "
        f"Mixtures: {sorted(seqio.MixtureRegistry.names())}; tasks: "
        f"{sorted(seqio.TaskRegistry.names())}. Register your own in a module "
        "named in config.data.task_modules.")
  mixture = seqio.get_mixture_or_task(name)
  return [(task.name, float(mixture.get_rate(task))) for task in mixture.tasks]
