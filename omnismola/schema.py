"""Every config field: its default, its type and its checks, in one place.

`base_config(preset)` is the config every file of configs/ starts from, each
field at its default with a comment saying what it does; the code reads
fields as they are, never with a default of its own. `check(config)`
refuses a config with a field unknown, missing, mistyped or out of range
(`CHECKS`) before anything is built or written. `config.model` and
`config.experts` are checked where they are used (docs/configuration.md).
"""
import json

import ml_collections

from omnismola import build
from omnismola import errors
from omnismola.train import optim
from omnismola.train import partitioning

TRUNCATION_POLICIES = ("truncate", "drop", "error")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Sections whose fields are not fixed here (see the module docstring).
OPEN_SECTIONS = ("model", "experts")


def base_config(preset: str = "small") -> ml_collections.ConfigDict:
  """Every field at its default, the backbone `preset` without experts."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = build.model_config_to_dict(preset)
  # Entries of dict(kind=..., targets=regex, **options): docs/experts.md.
  c.experts = []

  # Axis sizes within a slice (-1: the rest); `dcn` sizes them across slices
  # (multi-slice), e.g. --config.mesh.dcn.data=2: see docs/training.md.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1,
                dcn=dict(data=1, fsdp=1, tensor=1, expert=1))
  c.sharding_rules = [list(rule) for rule in partitioning.DEFAULT_RULES]

  c.data = dict(
      mixture="synthetic_mix",
      task_modules=(),
      feature_lengths=dict(prefix=48, suffix=32),
      # Examples longer than feature_lengths: "truncate" (cut, counted as
      # data/<task>/truncated), "drop" (skipped, data/<task>/dropped) or
      # "error". See docs/data.md.
      truncation="truncate",
      # Several examples per row, each with its own image: examples=M > 1
      # turns it on; text_length=0 means prefix + suffix. See docs/data.md.
      packing=dict(examples=0, text_length=0, window=64),
      tfds_data_dir="~/tensorflow_datasets",
      # Real datasets' files: <manual_dir>/<builder>/ ('' = under
      # tfds_data_dir/downloads/manual). See docs/data.md.
      manual_dir="",
      # "byte", or the path of a SentencePiece model (Gemma's for PaliGemma).
      vocabulary="byte",
      shuffle_buffer=10_000,
      # Your data as JSON-lines files, <dir>/<split>.jsonl: a task named
      # `name` scored with `metric`; put the name in `mixture`. See
      # docs/data.md.
      jsonl=dict(name="", dir="", metric="exact_match"),
  )
  # Images are resized to what the ViT takes; overriding
  # --config.model.vit.image_size moves both.
  c.data.image_size = c.model.vit.get_ref("image_size")

  c.train = dict(
      steps=1000,
      batch_size=32,
      lr=1e-3,
      warmup_steps=100,
      schedule="cosine",
      weight_decay=1e-4,
      grad_clip_norm=1.0,
      # Regex over parameter paths; everything else is frozen (no optimizer
      # state). From scratch everything must learn; from a pretrained
      # backbone, train the adapters only (".*/adapters/.*").
      trainable=r".*",
      # (regex, multiplier) pairs over trained parameter paths; the first
      # match scales that parameter's learning rate, e.g.
      # [(r".*/router/.*", 0.1)].
      lr_multipliers=(),
      # Forward/backward dtype; master weights and optimizer state are
      # float32 whatever this is ('bfloat16' on accelerators).
      compute_dtype="float32",
      microbatches=1,          # Gradient accumulation steps per batch.
      max_nonfinite_steps=20,  # Consecutive skipped steps before stopping.
      # Largest share of parameter bytes that every device may hold whole
      # (mesh > 1 device); above it the run stops, naming the parameters.
      # 1.0 = off: the default mesh is pure data parallelism.
      max_replicated_fraction=1.0,
      # Weights of the routers' auxiliary losses (sparse experts; SMoLA has
      # none): each averaged over a stack's layers, summed over blocks.
      aux_loss_weights=dict(balance_loss=0.01, z_loss=0.001),
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=3,
      # Resuming with another schedule (e.g. more steps) starts a new one,
      # warm-up and decay, at the resumed step; without it the run stops
      # (docs/training.md, "Resume").
      extend=False,
      # The step the schedule starts at: 0, or where `extend` started one
      # (taken from the checkpoint when resuming).
      schedule_start=0,
  )

  c.eval = dict(
      # Steps between evaluations during training (0 = off): the default
      # run shows its first scores at step 300, minutes in.
      every=300,
      at_end=True,       # Evaluate after the last step.
      tasks=(),          # Task names; empty = every task of the mixture.
      split="validation",  # The split to score ("test", "train", ...).
      batch_size=64,     # Global, as train.batch_size.
      max_examples=256,  # Per task; 0 = the whole split.
      max_new_tokens=32,
  )

  # Traces steps first_step .. first_step + steps - 1 to <workdir>/profile
  # for TensorBoard's profile plugin; steps=0: no trace.
  c.profile = dict(first_step=10, steps=0)

  c.init = dict(
      checkpoint="",  # A workdir or converted checkpoint to start from.
      # Experts whose dense MLP (or LoRA) the checkpoint has start as copies
      # of it; False: they keep their fresh initialisation (the
      # from-scratch baseline of upcycling), the rest still loads.
      upcycle=True,
      # Noise on experts upcycled from the checkpoint's dense MLPs.
      upcycle_noise_std=0.0,
      # ((model subtree, checkpoint, its subtree), ...): more parameters,
      # loaded after `checkpoint`, e.g. ("vit_1", DIR, "vit") makes another
      # run's encoder this model's second one (train/init.py).
      parts=(),
  )
  return c


def data_config(**fields) -> ml_collections.ConfigDict:
  """The base config's `data` section with `fields` set: for code that
  reads data alone (a notebook, a test)."""
  data = base_config().data
  data.update(fields)
  return data


def _packing_fits(c) -> bool:
  packing = c.data.packing
  return (packing.examples <= 1 or not packing.text_length or
          packing.text_length >= sum(c.data.feature_lengths.values()))


# (field, check, what it must be): the ranges that types cannot say.
CHECKS = (
    ("train.steps", lambda c: c.train.steps >= 1, ">= 1"),
    ("train.batch_size", lambda c: c.train.batch_size >= 1, ">= 1"),
    ("train.lr", lambda c: c.train.lr >= 0, ">= 0"),
    ("train.warmup_steps", lambda c: c.train.warmup_steps >= 0, ">= 0"),
    ("train.schedule", lambda c: c.train.schedule in optim.SCHEDULES,
     f"one of {optim.SCHEDULES}"),
    ("train.compute_dtype", lambda c: c.train.compute_dtype in COMPUTE_DTYPES,
     f"one of {COMPUTE_DTYPES}"),
    ("train.microbatches",
     lambda c: c.train.microbatches >= 1 and
     c.train.batch_size % c.train.microbatches == 0,
     ">= 1 and divide train.batch_size"),
    ("train.max_nonfinite_steps", lambda c: c.train.max_nonfinite_steps >= 1,
     ">= 1"),
    ("train.max_replicated_fraction",
     lambda c: 0 < c.train.max_replicated_fraction <= 1, "in (0, 1]"),
    ("train.log_every", lambda c: c.train.log_every >= 1, ">= 1"),
    ("train.checkpoint_every", lambda c: c.train.checkpoint_every >= 1,
     ">= 1"),
    ("train.keep_checkpoints", lambda c: c.train.keep_checkpoints >= 1,
     ">= 1"),
    ("data.truncation", lambda c: c.data.truncation in TRUNCATION_POLICIES,
     f"one of {TRUNCATION_POLICIES}"),
    ("data.packing.examples", lambda c: c.data.packing.examples >= 0,
     ">= 0 (0 or 1: no packing)"),
    ("data.packing.window",
     lambda c: (c.data.packing.examples <= 1 or
                c.data.packing.window >= c.data.packing.examples),
     "at least data.packing.examples"),
    ("data.packing.text_length", _packing_fits,
     "0 or at least one example's text (data.feature_lengths prefix + "
     "suffix): else such an example could fit no row"),
    ("eval.every", lambda c: c.eval.every >= 0, ">= 0 (0 = off)"),
    ("eval.batch_size", lambda c: c.eval.batch_size >= 1, ">= 1"),
    ("eval.max_examples", lambda c: c.eval.max_examples >= 0,
     ">= 0 (0 = the whole split)"),
    ("eval.max_new_tokens", lambda c: c.eval.max_new_tokens >= 1, ">= 1"),
    ("profile.first_step", lambda c: c.profile.first_step >= 1,
     ">= 1 (the first step is 1)"),
    ("profile.steps", lambda c: c.profile.steps >= 0, ">= 0 (0 = no trace)"),
    ("init.upcycle_noise_std", lambda c: c.init.upcycle_noise_std >= 0,
     ">= 0"),
    ("init.parts",
     lambda c: all(len(part) == 3 and all(isinstance(x, str) and x
                                          for x in part)
                   for part in c.init.parts),
     "(model subtree, checkpoint, checkpoint subtree) triples of non-empty "
     "strings"),
)


def _same_kind(value, default) -> bool:
  """Whether `value` may stand where the base has `default`."""
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(default))


def _check_fields(config, base, prefix: str) -> list[str]:
  """Problems of `config`'s fields against the base's, recursively."""
  fields, known = set(config.keys()), set(base.keys())
  problems = [f"config.{prefix}{name} is not a field; the fields of "
              f"config{'.' + prefix[:-1] if prefix else ''} are "
              f"{sorted(known)}." for name in sorted(fields - known)]
  problems += [f"config.{prefix}{name} is missing (start from "
               "schema.base_config())." for name in sorted(known - fields)]
  for name in sorted(fields & known):
    if not prefix and name in OPEN_SECTIONS:
      continue
    value, default = config[name], base[name]
    if isinstance(default, ml_collections.ConfigDict):
      if isinstance(value, ml_collections.ConfigDict):
        problems += _check_fields(value, default, f"{prefix}{name}.")
      else:
        problems.append(f"config.{prefix}{name} must be a section of fields, "
                        f"got {value!r}.")
    elif not _same_kind(value, default):
      problems.append(f"config.{prefix}{name}={value!r} must be of type "
                      f"{type(default).__name__}, as its default "
                      f"{default!r}.")
  return problems


def check(config) -> None:
  """Raises an InputError listing every field of `config` that is unknown,
  missing, of the wrong type or out of its range."""
  problems = _check_fields(config, base_config(), "")
  if not problems:  # Ranges are read from fields known to be well typed.
    values = flatten(config.to_dict())
    problems = [f"config.{field} must be {must}, got {values[field]!r}."
                for field, is_valid, must in CHECKS if not is_valid(config)]
  if problems:
    raise errors.InputError("Bad config:\n  " + "\n  ".join(problems))


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'train.steps': 1000, ...} of a nested dict; lists are values."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def changes(config) -> list[str]:
  """`field=value` for every field that differs from its default, besides
  the model's preset and the experts' kinds: a config in a few lines."""
  fields = json.loads(config.to_json_best_effort())
  defaults = json.loads(base_config().to_json_best_effort())
  kinds = [entry["kind"] for entry in fields["experts"]]
  lines = [f"model: {fields['model']['preset']}",
           f"experts: {', '.join(kinds) if kinds else 'none'}"]
  flat, flat_defaults = (flatten({k: v for k, v in f.items()
                                   if k not in OPEN_SECTIONS})
                         for f in (fields, defaults))
  return lines + [f"{field}={value!r}" for field, value in flat.items()
                  if flat_defaults[field] != value]
