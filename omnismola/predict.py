r"""--mode=predict: prompts on images with a trained (or pretrained) model.

  python -m omnismola.main --config=configs/mix.py --workdir=/tmp/mix \
      --mode=predict --image=cat.png --prompt="caption en"
  ... --mode=predict --predict_file=prompts.jsonl [--predict_output=OUT]

The model is the workdir's latest checkpoint or, without one,
config.init.checkpoint's with config.experts (zero-shot); prompts are
prepared as in evaluation and decoded greedily, on one process
(docs/training.md, "Predictions on your own images").
"""
import functools

from absl import logging

from omnismola import errors
from omnismola import pretrained
from omnismola import storage
from omnismola.eval import decode
from omnismola.eval import evaluator
from omnismola.train import init as init_lib
from omnismola.train import logging as log_lib


def load_model(config, workdir: str):
  """The workdir's model, or config.init.checkpoint's with config.experts;
  an InputError, before any work, where neither holds a checkpoint."""
  if init_lib.find_step_dir(workdir):
    if config.init.checkpoint:
      log_lib.print_line(f"Using the checkpoint in {workdir}; it takes "
                         "precedence over config.init.checkpoint="
                         f"{config.init.checkpoint}.")
    return pretrained.from_pretrained(workdir)
  if config.init.parts:
    raise errors.InputError(
        f"No checkpoint in {workdir}, and config.init.parts composes a model "
        "only for training and --mode=eval: train first (--mode=train).")
  if not config.init.checkpoint:
    raise errors.InputError(
        f"No checkpoint in {workdir}: train first (--mode=train), or pass "
        "--config.init.checkpoint=DIR (e.g. python -m omnismola.convert's "
        "output) to use a pretrained model as it is.")
  if not init_lib.find_step_dir(config.init.checkpoint):
    raise errors.InputError(f"config.init.checkpoint="
                            f"{config.init.checkpoint!r}: no checkpoint "
                            "there.")
  log_lib.print_line(f"No checkpoint in {workdir}: using "
                     f"config.init.checkpoint={config.init.checkpoint} as it "
                     "is (zero-shot).")
  return pretrained.from_pretrained(
      config.init.checkpoint, experts=list(config.experts))


def _decode_fn(config, model, eos_id: int):
  return lambda batch: decode.generate(
      model, batch, max_new_tokens=config.eval.max_new_tokens,
      eos_id=eos_id).tokens


def predict(config, workdir: str, image_path: str, prompt: str) -> str:
  """The model's answer to `prompt` about the image at `image_path`."""
  from omnismola.data import pipeline  # TensorFlow only from here on.

  batch = pipeline.prompt_batch(config.data, image_path, prompt)
  vocabulary = pipeline.get_vocabulary(config.data)
  model = load_model(config, workdir)
  tokens = _decode_fn(config, model, vocabulary.eos_id)(batch)
  return pipeline.detokenize(tokens[0].tolist(), vocabulary)


def predict_file(config, workdir: str, prompt_file: str,
                 output: str | None = None) -> str:
  """Answers every line of `prompt_file` (module docstring); returns the
  path written."""
  from omnismola.data import jsonl  # TensorFlow only from here on.
  from omnismola.data import pipeline

  prompts = jsonl.read_prompts(prompt_file)
  output = output or str(storage.path(workdir) / "predictions" /
                         storage.path(prompt_file).name)
  if storage.path(output) == storage.path(prompt_file):
    raise errors.InputError(f"--predict_output={output} would overwrite the "
                            "prompt file.")
  vocabulary = pipeline.get_vocabulary(config.data)
  model = load_model(config, workdir)
  batches = pipeline.prompt_file_batches(
      config.data, prompts, batch_size=config.eval.batch_size)
  records = evaluator.predict_split(
      _decode_fn(config, model, vocabulary.eos_id), batches,
      functools.partial(pipeline.detokenize, vocabulary=vocabulary))
  logging.info("Answered %d prompts of %s.", len(records), prompt_file)
  return evaluator.write_jsonl(output, [
      dict(id=record["id"], image=image, prompt=prompt,
           prediction=record["prediction"])
      for record, image, prompt in zip(records, prompts.images,
                                       prompts.prompts)])
