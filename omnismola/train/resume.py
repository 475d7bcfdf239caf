"""Whether a run may resume from a checkpoint with the config it was given.

Resuming with a config that trains something else would silently splice
two runs: `resumed_config` stops it before training, naming every changed
field. A new schedule is allowed with `train.extend=True` (docs/training.md,
"Resume and preemption").
"""
import copy
import json

from omnismola import errors
from omnismola import schema
from omnismola.train import optim

# Fields a resumed run may change (a field covers its subfields): they
# change how the run is laid out, logged or evaluated, not what it trains.
MAY_CHANGE = ("mesh", "sharding_rules", "eval", "profile", "init",
              "data.tfds_data_dir", "data.manual_dir", "train.log_every",
              "train.checkpoint_every", "train.keep_checkpoints",
              "train.max_nonfinite_steps", "train.max_replicated_fraction",
              "train.microbatches", "train.compute_dtype", "train.extend")
SCHEDULE = tuple(f"train.{name}" for name in optim.SCHEDULE_FIELDS)


class ConfigChangedError(errors.InputError):
  """The config changes what the resumed run trains."""


def may_change(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in MAY_CHANGE)


def schedule_changes(old: dict, new: dict) -> list[str]:
  """The schedule fields (flat names) whose change changes a step's rate."""
  names = set(optim.schedule_fields(old["train.schedule"]))
  names |= set(optim.schedule_fields(new["train.schedule"]))
  return sorted(f"train.{n}" for n in names
                if old[f"train.{n}"] != new[f"train.{n}"])


def other_changes(old: dict, new: dict) -> list[str]:
  """The other fields of both configs whose change changes the run (a field
  only one has is skipped: new fields default to the old behaviour)."""
  return sorted(f for f in old.keys() & new.keys()
                if old[f] != new[f] and not may_change(f)
                and f not in SCHEDULE)


def resumed_config(config, saved: dict, step: int):
  """`config` to train on with from `step`, whose checkpoint saved `saved`:
  its schedule starts where the checkpoint's did, or, extended, at `step`.
  Anything else that changes the run raises ConfigChangedError."""
  old = schema.flatten(saved)
  old.setdefault("train.schedule_start", 0)  # Saved before there was one.
  # Compared as a checkpoint holds them (JSON: tuples are lists).
  new = schema.flatten(json.loads(json.dumps(config.to_dict())))
  new["train.schedule_start"] = old["train.schedule_start"]
  others, schedule = other_changes(old, new), schedule_changes(old, new)
  extend = bool(schedule) and config.train.extend
  if others or (schedule and not extend):
    raise ConfigChangedError(_message(old, new, others, schedule, step))
  if extend and config.train.steps <= step:
    raise ConfigChangedError(
        f"config.train.extend: the checkpoint is at step {step}, so "
        f"train.steps={config.train.steps} leaves nothing to train; raise "
        "train.steps above it.")
  resumed = copy.deepcopy(config)
  resumed.train.schedule_start = step if extend else old["train.schedule_start"]
  return resumed


def _message(old: dict, new: dict, others: list[str], schedule: list[str],
             step: int) -> str:
  lines = [f"The checkpoint of step {step} was trained with another config; "
           "resuming would change what the run trains:"]
  lines += [f"  {f}: {json.dumps(old[f])} → {json.dumps(new[f])}"
            for f in others + schedule]
  if others:
    lines.append("Resume with the checkpoint's values (its config is "
                 f"checkpoints/{step}/config), or train a new run in another "
                 "--workdir; --config.init.checkpoint=<this workdir> starts "
                 "it from these parameters.")
  else:
    lines.append(
        f"To train on with a new learning-rate schedule from step {step} "
        "(warm-up, then decay to train.steps), add "
        "--config.train.extend=True; to go on with the old one, resume with "
        "the checkpoint's values.")
  return "\n".join(lines)
