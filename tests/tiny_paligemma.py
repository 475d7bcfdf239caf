"""A tiny random PaliGemma in the three forms the real path meets.

  from tiny_paligemma import build
  tiny = build(tmp_path)          # -> TinyPaliGemma
  tiny.hf_dir                     # Hugging Face directory (config.json +
                                  #   model.safetensors, save_pretrained's)
  tiny.tokenizer                  # SentencePiece .model, Gemma's special ids
  tiny.converted_dir              # `python -m omnismola.convert` of hf_dir
  tiny.big_vision_npz             # the same weights as big_vision's .npz
  tiny.hf_model()                 # the transformers model (torch, eval mode)
  hf_tokenizer(tiny.tokenizer)    # transformers.GemmaTokenizer of it

or, in a test module, the session-wide fixture (built once per worker):

  from tiny_paligemma import tiny_paligemma  # noqa: F401 (a fixture)
  def test_x(tiny_paligemma): ...

Sizes mirror PaliGemma 3B's architecture at toy scale: a SigLIP-style ViT,
a Gemma 1 decoder with one key/value head, a linear projector; the embedding
has more rows than the tokenizer has pieces, as Hugging Face's 257,216 rows
do for Gemma's 257,152 (`VOCAB_SIZE` vs `SP_PIECES`). Weights are random
with sizeable scales, so greedy generations are varied, not one token
repeated.

The tokenizer is trained here (no file ships with the tests) with Gemma's
id layout, piece names and options: <pad> 0, <eos> 1, <bos> 2, <unk> 3,
byte fallback, digits split, whitespace kept as it is, "\\n" one piece of
its own. `hf_tokenizer(path)` loads it as transformers' GemmaTokenizer.

The constants (IMAGE_SIZE, NUM_IMAGE_TOKENS, the special ids, SP_PIECES,
VOCAB_SIZE, IMAGE_TOKEN) describe the model. No preset has its shapes; a
command written for `preset=paligemma_3b_224` runs on it, in process, with
the `tiny_paligemma_3b` fixture: that preset gets the tiny model's sizes,
with the tokenizer's SP_PIECES as vocab_size (as the real preset has
big_vision's 257,152, fewer than the Hugging Face checkpoint's rows).
"""
import dataclasses
import os

import pytest

IMAGE_SIZE, PATCH = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH)**2
PAD, EOS, BOS, UNK, NEWLINE = range(5)   # Gemma's special ids, then "\n".
SP_PIECES = 384                    # 256 byte pieces, the specials, merges.
VOCAB_SIZE = SP_PIECES + 64        # The embedding's rows (padded, as HF's).
# transformers' GemmaTokenizer appends <mask> to the pieces, and
# PaliGemmaProcessor <image> after it.
IMAGE_TOKEN = SP_PIECES + 1
SEED = 0

WORDS = ("caption", "answer", "en", "what", "color", "is", "the", "square",
         "circle", "star", "red", "green", "blue", "gold", "left", "right",
         "how", "many", "shapes", "are", "there", "describe", "image")


def _sentences() -> list[str]:
  """Varied short sentences, some with newlines and digits."""
  n = len(WORDS)
  return [" ".join(WORDS[(i * k + j) % n] for j in range(3 + i % 6)) +
          ("\n" if i % 3 == 0 else f" {i}")
          for i in range(200) for k in (1, 5, 7)]


def train_tokenizer(prefix: str) -> str:
  """Trains the tiny Gemma-like SentencePiece model; returns its .model."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_sentences()), model_prefix=prefix,
      model_type="bpe", vocab_size=SP_PIECES, character_coverage=1.0,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      byte_fallback=True,
      split_digits=True, normalization_rule_name="identity",
      add_dummy_prefix=False, remove_extra_whitespaces=False,
      user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
      minloglevel=2)
  return f"{prefix}.model"


def hf_tokenizer(tokenizer: str):
  """transformers' GemmaTokenizer of a SentencePiece model file (converted
  by transformers from the directory that holds it as tokenizer.model)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as directory:
    shutil.copy(tokenizer, os.path.join(directory, "tokenizer.model"))
    return transformers.GemmaTokenizer.from_pretrained(directory)


def hf_config():
  """The transformers PaliGemmaConfig of the tiny model."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.PaliGemmaConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         image_size=IMAGE_SIZE, patch_size=PATCH,
                         projection_dim=32, vision_use_head=False),
      text_config=dict(model_type="gemma", hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, vocab_size=VOCAB_SIZE),
      image_token_index=IMAGE_TOKEN, projection_dim=32)


def random_hf_model(seed: int = SEED):
  """A PaliGemmaForConditionalGeneration with sizeable random weights.

  The default init (std 0.02, unit norms) makes near-uniform logits whose
  argmax any rounding could flip; and with embeddings as large as the rest,
  greedy decoding repeats one token (the tied embedding of the last token
  dominates its logits). Embeddings N(0, 0.1), the rest N(0, 0.5), give
  varied generations.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = transformers.PaliGemmaForConditionalGeneration(hf_config())
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.copy_(torch.randn_like(param) *
                  (0.1 if "embed_tokens" in name else 0.5))
  return model.eval()


def write_big_vision_npz(hf_dir: str, path: str) -> str:
  """The model of `hf_dir` as big_vision's scanned PaliGemma `.npz`.

  The embedding keeps the tokenizer's rows only (SP_PIECES), as big_vision's
  257,152 do where Hugging Face has 257,216.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from omnismola.models.convert import hf_paligemma
  fields, params = hf_paligemma.load(hf_dir)
  vit, decoder = params["vit"], params["decoder"]
  v, d = vit["layers"], decoder["layers"]
  p, depth = fields["vit"]["patch_size"], fields["vit"]["depth"]
  vit_heads = fields["vit"]["num_heads"]
  heads, kv_heads = (fields["decoder"]["num_heads"],
                     fields["decoder"]["num_kv_heads"])
  head_dim = fields["decoder"]["head_dim"]

  def vit_heads_out(kernel):  # [L, Wv, H*hd] -> [L, Wv, H, hd]
    return kernel.reshape(*kernel.shape[:2], vit_heads, -1)

  def einsum(kernel, n):  # [L, Wd, n*hd] -> [L, n, Wd, hd]
    return kernel.reshape(*kernel.shape[:2], n, head_dim).transpose(0, 2, 1,
                                                                    3)

  block = "img/Transformer/encoderblock/"
  mha = block + "MultiHeadDotProductAttention_0/"
  arrays = {
      "img/embedding/kernel": vit["embedding"]["kernel"].reshape(p, p, 3, -1),
      "img/embedding/bias": vit["embedding"]["bias"],
      "img/pos_embedding": vit["pos_embedding"][None],
      **{f"{block}LayerNorm_{i}/{k}": v[norm][k]
         for i, norm in enumerate(("norm1", "norm2"))
         for k in ("scale", "bias")},
      **{f"{mha}{name}/kernel": vit_heads_out(v["attn"][ours]["kernel"])
         for name, ours in (("query", "q"), ("key", "k"), ("value", "v"))},
      **{f"{mha}{name}/bias": v["attn"][ours]["bias"].reshape(
          depth, vit_heads, -1)
         for name, ours in (("query", "q"), ("key", "k"), ("value", "v"))},
      mha + "out/kernel": v["attn"]["o"]["kernel"].reshape(
          depth, vit_heads, -1, v["attn"]["o"]["kernel"].shape[-1]),
      mha + "out/bias": v["attn"]["o"]["bias"],
      **{f"{block}MlpBlock_0/Dense_{i}/{k}": v["mlp"][fc][k]
         for i, fc in enumerate(("fc1", "fc2")) for k in ("kernel", "bias")},
      "img/Transformer/encoder_norm/scale": vit["norm"]["scale"],
      "img/Transformer/encoder_norm/bias": vit["norm"]["bias"],
      "img/head/kernel": params["connector"]["proj"]["kernel"],
      "img/head/bias": params["connector"]["proj"]["bias"],
      "llm/embedder/input_embedding":
          decoder["embedder"]["embedding"][:SP_PIECES],
      "llm/layers/pre_attention_norm/scale": d["pre_attn_norm"]["scale"],
      "llm/layers/pre_ffw_norm/scale": d["pre_mlp_norm"]["scale"],
      "llm/layers/attn/q_einsum/w": einsum(d["attn"]["q"]["kernel"], heads),
      "llm/layers/attn/kv_einsum/w": np.stack(
          [einsum(d["attn"][n]["kernel"], kv_heads) for n in "kv"], 1),
      "llm/layers/attn/attn_vec_einsum/w": d["attn"]["o"]["kernel"].reshape(
          depth, heads, head_dim, -1),
      "llm/layers/mlp/gating_einsum": np.stack(
          [d["mlp"]["gate"]["kernel"], d["mlp"]["up"]["kernel"]], 1),
      "llm/layers/mlp/linear": d["mlp"]["down"]["kernel"],
      "llm/final_norm/scale": decoder["final_norm"]["scale"],
  }
  np.savez(path, **{k: np.asarray(a) for k, a in arrays.items()})
  return path


@dataclasses.dataclass(frozen=True)
class TinyPaliGemma:
  hf_dir: str
  tokenizer: str
  converted_dir: str
  big_vision_npz: str

  def hf_model(self):
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        self.hf_dir).eval()


def build(root) -> TinyPaliGemma:
  """Writes root/hf, root/tokenizer.model, root/converted and
  root/big_vision.npz."""
  from omnismola import convert  # pylint: disable=g-import-not-at-top
  root = os.fspath(root)
  hf_dir = os.path.join(root, "hf")
  random_hf_model().save_pretrained(hf_dir)
  tokenizer = train_tokenizer(os.path.join(root, "tokenizer"))
  converted = convert.convert("hf_paligemma", hf_dir,
                              os.path.join(root, "converted"))
  npz = write_big_vision_npz(hf_dir, os.path.join(root, "big_vision.npz"))
  return TinyPaliGemma(hf_dir, tokenizer, converted, npz)


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory) -> TinyPaliGemma:
  """`build` once per test session (worker)."""
  return build(tmp_path_factory.mktemp("tiny_paligemma"))


@pytest.fixture
def tiny_paligemma_3b(tiny_paligemma, monkeypatch) -> TinyPaliGemma:
  """`tiny_paligemma`, with the paligemma_3b_224 preset standing for it."""
  # pylint: disable-next=g-import-not-at-top
  from omnismola import build, pretrained
  from omnismola.models import presets  # pylint: disable=g-import-not-at-top
  tiny = build.vlm_config(pretrained.read_config(os.path.join(
      tiny_paligemma.converted_dir, "checkpoints", "0"))["model"])
  monkeypatch.setitem(presets.PRESETS, "paligemma_3b_224", dataclasses.replace(
      presets.PRESETS["paligemma_3b_224"], vit=tiny.vit,
      decoder=dataclasses.replace(tiny.decoder, vocab_size=SP_PIECES)))
  return tiny_paligemma
