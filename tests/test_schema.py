"""The config schema: every shipped config passes it, and a field that is
unknown, missing, mistyped or out of range is refused by name."""
import glob
import importlib.util
import os

import ml_collections
import pytest

from omnismola import config_lib
from omnismola import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shipped_configs():
  """Every config file with each of its stages (configs/*.py STAGES)."""
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    stages = getattr(module, "STAGES", None) or [None]
    yield from (os.path.relpath(path, ROOT) +
                (f":stage={stage}" if stage else "") for stage in stages)


@pytest.mark.parametrize("spec", list(_shipped_configs()))
def test_every_shipped_config_and_stage_passes(spec):
  schema.check(config_lib.load_config_file(os.path.join(ROOT, spec)))


def test_data_config_is_the_base_data_section_with_fields_set():
  data = schema.data_config(mixture="mine", truncation="drop")
  assert data.mixture == "mine" and data.truncation == "drop"
  assert data.packing == schema.base_config().data.packing


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.train.update(stpes=10),
     r"config.train.stpes is not a field; the fields of config.train are"),
    (lambda c: c.eval.__delattr__("split"), r"config.eval.split is missing"),
])
def test_unknown_missing_and_misplaced_fields_are_refused(edit, message):
  config = schema.base_config("tiny")
  edit(config)
  with pytest.raises(ValueError, match=message):
    schema.check(config)


@pytest.mark.parametrize("field, value, message", [
    ("train.steps", "100", r"config.train.steps='100' must be of type int"),
    ("train.extend", 1, r"config.train.extend=1 must be of type bool"),
    ("eval.tasks", "ocr", r"config.eval.tasks='ocr' must be of type tuple"),
    ("train.steps", 0, r"config.train.steps must be >= 1, got 0"),
    ("train.microbatches", 3,
     r"config.train.microbatches must be >= 1 and divide train.batch_size"),
    ("train.schedule", "linear", r"train.schedule must be one of"),
    ("train.compute_dtype", "fp8", r"train.compute_dtype must be one of"),
    ("data.truncation", "cut", r"data.truncation must be one of"),
    ("train.max_replicated_fraction", 0.0, r"must be in \(0, 1\]"),
    ("train.max_nonfinite_steps", 0, r"max_nonfinite_steps must be >= 1"),
    ("profile.first_step", 0, r"profile.first_step must be >= 1"),
    ("profile.steps", -1, r"profile.steps must be >= 0"),
    ("eval.every", -5, r"eval.every must be >= 0"),
])
def test_mistyped_and_out_of_range_values_are_refused(field, value, message):
  config = schema.base_config("tiny")
  section, name = field.split(".")
  # As a config file writing the section whole would (assigning the field
  # alone is type-checked by ml_collections already).
  config[section] = dict(config[section].to_dict(), **{name: value})
  with pytest.raises(ValueError, match=message):
    schema.check(config)


def test_a_field_where_a_section_belongs_is_refused():
  fields = schema.base_config("tiny").to_dict()
  with pytest.raises(ValueError, match="config.data must be a section"):
    schema.check(ml_collections.ConfigDict(dict(fields, data="my_mix")))


def test_an_int_may_stand_for_a_float():
  config = schema.base_config("tiny")
  config.train.lr = 1
  schema.check(config)
