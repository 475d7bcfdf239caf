"""--mode=predict: one prompt on one image with a trained (or converted) model.

  python -m omnismola.main --config=configs/mix.py --workdir=/tmp/mix \
      --mode=predict --image=cat.png --prompt="caption en"

The model and its experts come from the workdir's checkpoint
(`omnismola.from_pretrained`); the vocabulary, image size and decoding
length from the config, as in evaluation. Decoding is greedy.
"""
from omnismola import pretrained
from omnismola.eval import decode


def predict(config, workdir: str, image_path: str, prompt: str) -> str:
  """The model's answer to `prompt` about the image at `image_path`."""
  from omnismola.data import pipeline  # TensorFlow only from here on.

  model = pretrained.from_pretrained(workdir)
  batch = pipeline.prompt_batch(config.data, image_path, prompt)
  vocabulary = pipeline.get_vocabulary(config.data)
  tokens = decode.generate(model, batch,
                           max_new_tokens=config.eval.max_new_tokens,
                           eos_id=vocabulary.eos_id).tokens
  return pipeline.detokenize(tokens[0].tolist(), vocabulary)
