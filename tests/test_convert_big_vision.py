"""Import of big_vision PaliGemma `.npz` checkpoints (tiny random ones).

The checkpoints are written with big_vision's key names and shapes, as
documented in `omnismola/models/convert/big_vision.py` (vit.py, ppp/gemma.py,
proj/paligemma/*.py of google-research/big_vision).
"""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import tiny_paligemma
from omnismola import build, convert, pretrained
from omnismola.models.convert import big_vision as bv
from omnismola.models.convert import hf_paligemma
from omnismola.models.decoder import DecoderConfig
from omnismola.models.vit import ViTConfig, patchify

# Tiny sizes. Gemma's mlp_dim must exceed its width (gating_einsum's
# orientation is detected by that, as in gemma.py).
VIT = dict(patch=2, grid=4, width=12, heads=3, mlp=20, depth=2)
LLM = dict(vocab=32, width=16, heads=4, kv_heads=1, head_dim=8, mlp=40,
           depth=3)


def _bv_checkpoint(*, gemma2=False, kv_heads=1, seed=0):
  """A flat {big_vision name: float32 array}, scanned (stacked) layout."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  p, n = VIT["patch"], VIT["grid"]**2
  wv, hv, mv, dv = VIT["width"], VIT["heads"], VIT["mlp"], VIT["depth"]
  hdv = wv // hv
  wd, h, hd, m, d = (LLM["width"], LLM["heads"], LLM["head_dim"], LLM["mlp"],
                     LLM["depth"])
  blk = "img/Transformer/encoderblock/"
  mha = blk + "MultiHeadDotProductAttention_0/"
  ckpt = {
      "img/embedding/kernel": r(p, p, 3, wv),
      "img/embedding/bias": r(wv),
      "img/pos_embedding": r(1, n, wv),
      blk + "LayerNorm_0/scale": r(dv, wv),
      blk + "LayerNorm_0/bias": r(dv, wv),
      blk + "LayerNorm_1/scale": r(dv, wv),
      blk + "LayerNorm_1/bias": r(dv, wv),
      blk + "MlpBlock_0/Dense_0/kernel": r(dv, wv, mv),
      blk + "MlpBlock_0/Dense_0/bias": r(dv, mv),
      blk + "MlpBlock_0/Dense_1/kernel": r(dv, mv, wv),
      blk + "MlpBlock_0/Dense_1/bias": r(dv, wv),
      mha + "out/kernel": r(dv, hv, hdv, wv),
      mha + "out/bias": r(dv, wv),
      "img/Transformer/encoder_norm/scale": r(wv),
      "img/Transformer/encoder_norm/bias": r(wv),
      "img/head/kernel": r(wv, wd),
      "img/head/bias": r(wd),
      "llm/embedder/input_embedding": r(LLM["vocab"], wd),
      "llm/layers/pre_attention_norm/scale": r(d, wd),
      "llm/layers/pre_ffw_norm/scale": r(d, wd),
      "llm/layers/attn/attn_vec_einsum/w": r(d, h, hd, wd),
      "llm/layers/mlp/gating_einsum": r(d, 2, wd, m),
      "llm/layers/mlp/linear": r(d, m, wd),
      "llm/final_norm/scale": r(wd),
  }
  for name in ("query", "key", "value"):
    ckpt[mha + f"{name}/kernel"] = r(dv, wv, hv, hdv)
    ckpt[mha + f"{name}/bias"] = r(dv, hv, hdv)
  if kv_heads == h:   # gemma_7b style (gemma.py L263-268).
    ckpt["llm/layers/attn/qkv_einsum/w"] = r(d, 3, h, wd, hd)
  else:               # gemma_2b / Gemma 2 (gemma.py L270-279).
    ckpt["llm/layers/attn/q_einsum/w"] = r(d, h, wd, hd)
    ckpt["llm/layers/attn/kv_einsum/w"] = r(d, 2, kv_heads, wd, hd)
  if gemma2:
    ckpt["llm/layers/post_attention_norm/scale"] = r(d, wd)
    ckpt["llm/layers/post_ffw_norm/scale"] = r(d, wd)
  return ckpt


def _unscan(ckpt):
  """The same parameters in big_vision's python-loop (unscanned) layout."""
  out = {}
  for key, value in ckpt.items():
    if key.startswith("img/Transformer/encoderblock/"):
      rest = key[len("img/Transformer/encoderblock/"):]
      for i, layer in enumerate(value):
        out[f"img/Transformer/encoderblock_{i}/{rest}"] = layer
    elif key.startswith("llm/layers/"):
      rest = key[len("llm/layers/"):]
      for i, layer in enumerate(value):
        out[f"llm/layers/{i}/{rest}"] = layer
    else:
      out[key] = value
  return out


def _save(tmp_path, ckpt, name="ckpt.npz"):
  path = tmp_path / name
  np.savez(path, **ckpt)
  return path


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _target_shapes(*, post_norms, kv_heads):
  p, n = VIT["patch"], VIT["grid"]**2
  wv, mv, dv = VIT["width"], VIT["mlp"], VIT["depth"]
  wd, h, hd, m, d = (LLM["width"], LLM["heads"], LLM["head_dim"], LLM["mlp"],
                     LLM["depth"])
  shapes = {
      "vit/embedding/kernel": (p * p * 3, wv),
      "vit/embedding/bias": (wv,),
      "vit/pos_embedding": (n, wv),
      "vit/layers/norm1/scale": (dv, wv), "vit/layers/norm1/bias": (dv, wv),
      "vit/layers/norm2/scale": (dv, wv), "vit/layers/norm2/bias": (dv, wv),
      "vit/layers/attn/o/kernel": (dv, wv, wv),
      "vit/layers/attn/o/bias": (dv, wv),
      "vit/layers/mlp/fc1/kernel": (dv, wv, mv),
      "vit/layers/mlp/fc1/bias": (dv, mv),
      "vit/layers/mlp/fc2/kernel": (dv, mv, wv),
      "vit/layers/mlp/fc2/bias": (dv, wv),
      "vit/norm/scale": (wv,), "vit/norm/bias": (wv,),
      "connector/proj/kernel": (wv, wd), "connector/proj/bias": (wd,),
      "decoder/embedder/embedding": (LLM["vocab"], wd),
      "decoder/layers/pre_attn_norm/scale": (d, wd),
      "decoder/layers/attn/q/kernel": (d, wd, h * hd),
      "decoder/layers/attn/k/kernel": (d, wd, kv_heads * hd),
      "decoder/layers/attn/v/kernel": (d, wd, kv_heads * hd),
      "decoder/layers/attn/o/kernel": (d, h * hd, wd),
      "decoder/layers/pre_mlp_norm/scale": (d, wd),
      "decoder/layers/mlp/gate/kernel": (d, wd, m),
      "decoder/layers/mlp/up/kernel": (d, wd, m),
      "decoder/layers/mlp/down/kernel": (d, m, wd),
      "decoder/final_norm/scale": (wd,),
  }
  for x in "qkv":
    shapes[f"vit/layers/attn/{x}/kernel"] = (dv, wv, wv)
    shapes[f"vit/layers/attn/{x}/bias"] = (dv, wv)
  if post_norms:
    shapes["decoder/layers/post_attn_norm/scale"] = (d, wd)
    shapes["decoder/layers/post_mlp_norm/scale"] = (d, wd)
  return shapes


def _check_all(ckpt, params, *, kv_heads, post_norms):
  """Checks every target array against the big_vision arrays and semantics."""
  flat = _flatten(params)
  expected = _target_shapes(post_norms=post_norms, kv_heads=kv_heads)
  assert {k: v.shape for k, v in flat.items()} == expected
  rng = np.random.default_rng(1)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  # Patch embedding: Dense(patchify(image)) == big_vision's stride-p nn.Conv.
  p, g, wv = VIT["patch"], VIT["grid"], VIT["width"]
  image = rng.standard_normal((2, g * p, g * p, 3)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(
      image, ckpt["img/embedding/kernel"], window_strides=(p, p),
      padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = patchify(jnp.asarray(image), p) @ flat["vit/embedding/kernel"]
  close(ours, np.asarray(conv).reshape(2, g * g, wv))
  np.testing.assert_array_equal(flat["vit/embedding/bias"],
                                ckpt["img/embedding/bias"])
  np.testing.assert_array_equal(flat["vit/pos_embedding"],
                                ckpt["img/pos_embedding"][0])

  # ViT blocks: copies, and flax DenseGeneral semantics for attention.
  blk = "img/Transformer/encoderblock/"
  mha = blk + "MultiHeadDotProductAttention_0/"
  copies = {
      "vit/layers/norm1/scale": blk + "LayerNorm_0/scale",
      "vit/layers/norm1/bias": blk + "LayerNorm_0/bias",
      "vit/layers/norm2/scale": blk + "LayerNorm_1/scale",
      "vit/layers/norm2/bias": blk + "LayerNorm_1/bias",
      "vit/layers/mlp/fc1/kernel": blk + "MlpBlock_0/Dense_0/kernel",
      "vit/layers/mlp/fc1/bias": blk + "MlpBlock_0/Dense_0/bias",
      "vit/layers/mlp/fc2/kernel": blk + "MlpBlock_0/Dense_1/kernel",
      "vit/layers/mlp/fc2/bias": blk + "MlpBlock_0/Dense_1/bias",
      "vit/layers/attn/o/bias": mha + "out/bias",
      "vit/norm/scale": "img/Transformer/encoder_norm/scale",
      "vit/norm/bias": "img/Transformer/encoder_norm/bias",
      "connector/proj/kernel": "img/head/kernel",
      "connector/proj/bias": "img/head/bias",
      "decoder/embedder/embedding": "llm/embedder/input_embedding",
      "decoder/layers/pre_attn_norm/scale":
          "llm/layers/pre_attention_norm/scale",
      "decoder/layers/pre_mlp_norm/scale": "llm/layers/pre_ffw_norm/scale",
      "decoder/layers/mlp/down/kernel": "llm/layers/mlp/linear",
      "decoder/final_norm/scale": "llm/final_norm/scale",
  }
  if post_norms:
    copies["decoder/layers/post_attn_norm/scale"] = (
        "llm/layers/post_attention_norm/scale")
    copies["decoder/layers/post_mlp_norm/scale"] = (
        "llm/layers/post_ffw_norm/scale")
  for ours_key, bv_key in copies.items():
    np.testing.assert_array_equal(flat[ours_key], ckpt[bv_key], ours_key)

  x = rng.standard_normal((5, wv)).astype(np.float32)
  for layer in range(VIT["depth"]):
    for ours_name, bv_name in (("q", "query"), ("k", "key"), ("v", "value")):
      # flax MHDPA: DenseGeneral(features=(H, hd)): "nd,dhk->nhk" + bias.
      ref = (np.einsum("nd,dhk->nhk", x, ckpt[mha + bv_name + "/kernel"][layer])
             + ckpt[mha + bv_name + "/bias"][layer])
      got = (x @ flat[f"vit/layers/attn/{ours_name}/kernel"][layer]
             + flat[f"vit/layers/attn/{ours_name}/bias"][layer])
      close(got, ref.reshape(5, wv))
    y = rng.standard_normal((5, VIT["heads"], wv // VIT["heads"]))
    ref = np.einsum("nhk,hkd->nd", y, ckpt[mha + "out/kernel"][layer])
    close(y.reshape(5, wv) @ flat["vit/layers/attn/o/kernel"][layer], ref)

  # Decoder attention: gemma.py's einsums vs our heads-major Dense kernels.
  wd, h, hd = LLM["width"], LLM["heads"], LLM["head_dim"]
  xs = rng.standard_normal((2, 3, wd)).astype(np.float32)
  for layer in range(LLM["depth"]):
    if kv_heads == h:
      qkv = ckpt["llm/layers/attn/qkv_einsum/w"][layer]
      # gemma.py L288 "BSD,3KDH->3BSKH" (numpy needs a letter for the 3).
      q_ref, k_ref, v_ref = np.einsum("BSD,CKDH->CBSKH", xs, qkv)
    else:
      q_ref = np.einsum("BTD,NDH->BTNH", xs,
                        ckpt["llm/layers/attn/q_einsum/w"][layer])   # L290
      k_ref, v_ref = np.einsum("BSD,CKDH->CBSKH", xs,  # L291
                               ckpt["llm/layers/attn/kv_einsum/w"][layer])
    for name, ref, n in (("q", q_ref, h), ("k", k_ref, kv_heads),
                         ("v", v_ref, kv_heads)):
      got = xs @ flat[f"decoder/layers/attn/{name}/kernel"][layer]
      close(got.reshape(2, 3, n, hd), ref)   # heads-major: column h*hd + d
    enc = rng.standard_normal((2, 3, h, hd)).astype(np.float32)
    ref = np.einsum("BTNH,NHD->BTD", enc,
                    ckpt["llm/layers/attn/attn_vec_einsum/w"][layer])  # L331
    close(enc.reshape(2, 3, h * hd) @ flat["decoder/layers/attn/o/kernel"][
        layer], ref)

    # FeedForward, gemma.py L349-353: gate = gelu(x @ w[0]), up = x @ w[1].
    w = ckpt["llm/layers/mlp/gating_einsum"][layer]
    np.testing.assert_array_equal(flat["decoder/layers/mlp/gate/kernel"][layer],
                                  w[0])
    np.testing.assert_array_equal(flat["decoder/layers/mlp/up/kernel"][layer],
                                  w[1])
    gelu = lambda a: np.asarray(jax.nn.gelu(a, approximate=True))
    ref = (gelu(xs @ w[0]) * (xs @ w[1])) @ ckpt["llm/layers/mlp/linear"][
        layer]
    got = (gelu(xs @ flat["decoder/layers/mlp/gate/kernel"][layer])
           * (xs @ flat["decoder/layers/mlp/up/kernel"][layer])) @ flat[
               "decoder/layers/mlp/down/kernel"][layer]
    close(got, ref)


def _check_sizes(config, *, kv_heads):
  assert config["connector"] == "linear"
  assert config["vit"] == dict(
      image_size=VIT["grid"] * VIT["patch"], patch_size=VIT["patch"],
      width=VIT["width"], depth=VIT["depth"], num_heads=VIT["heads"],
      mlp_dim=VIT["mlp"])
  dec = config["decoder"]
  assert {k: dec[k] for k in ("vocab_size", "width", "depth", "num_heads",
                              "num_kv_heads", "head_dim", "mlp_dim")} == dict(
      vocab_size=LLM["vocab"], width=LLM["width"], depth=LLM["depth"],
      num_heads=LLM["heads"], num_kv_heads=kv_heads,
      head_dim=LLM["head_dim"], mlp_dim=LLM["mlp"])
  assert dec["rope_max_wavelength"] == 10_000.0 and dec["norm_eps"] == 1e-6
  # The config dicts build our config dataclasses.
  ViTConfig(**config["vit"])
  DecoderConfig(**dec)


def test_paligemma_gemma1(tmp_path):
  ckpt = _bv_checkpoint(gemma2=False, kv_heads=1)
  config, params = bv.load_npz(_save(tmp_path, ckpt))
  _check_all(ckpt, params, kv_heads=1, post_norms=False)
  _check_sizes(config, kv_heads=1)
  dec = config["decoder"]
  assert (dec["post_norms"], dec["attn_logit_softcap"],
          dec["final_logit_softcap"], dec["query_pre_attn_scalar"],
          dec["sliding_window"]) == (False, 0.0, 0.0, 0.0, 0)


def test_paligemma2_gemma2(tmp_path):
  ckpt = _bv_checkpoint(gemma2=True, kv_heads=2)
  # The tiny sizes match no big_vision Gemma 2 variant: warn, use defaults.
  with pytest.warns(UserWarning, match="match no big_vision variant"):
    config, params = bv.load_npz(_save(tmp_path, ckpt))
  _check_all(ckpt, params, kv_heads=2, post_norms=True)
  _check_sizes(config, kv_heads=2)
  dec = config["decoder"]
  assert (dec["post_norms"], dec["attn_logit_softcap"],
          dec["final_logit_softcap"], dec["query_pre_attn_scalar"],
          dec["sliding_window"]) == (True, 50.0, 30.0, 0.0, 4096)


def test_fused_qkv_einsum(tmp_path):
  """gemma_7b style: qkv_einsum [3, H, Wd, hd] when kv heads == heads."""
  ckpt = _bv_checkpoint(kv_heads=LLM["heads"])
  config, params = bv.load_npz(_save(tmp_path, ckpt))
  _check_all(ckpt, params, kv_heads=LLM["heads"], post_norms=False)
  assert config["decoder"]["num_kv_heads"] == LLM["heads"]


def test_unscanned_layout_matches_scanned(tmp_path):
  ckpt = _bv_checkpoint(gemma2=True, kv_heads=2, seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config_s, params_s = bv.load_npz(_save(tmp_path, ckpt, "scan.npz"))
    config_l, params_l = bv.load_npz(_save(tmp_path, _unscan(ckpt),
                                           "loop.npz"))
  assert config_s == config_l
  flat_s, flat_l = _flatten(params_s), _flatten(params_l)
  assert flat_s.keys() == flat_l.keys()
  for k in flat_s:
    np.testing.assert_array_equal(flat_s[k], flat_l[k], k)


def test_params_root_bfloat16_and_transposed_gating(tmp_path):
  """`params/` root (optimizer state ignored), bf16 as V2, [2, M, Wd]."""
  ckpt = _bv_checkpoint()
  stored = {f"params/{k}": v.astype(ml_dtypes.bfloat16)
            for k, v in ckpt.items()}
  stored["params/llm/layers/mlp/gating_einsum"] = (
      ckpt["llm/layers/mlp/gating_einsum"].transpose(0, 1, 3, 2))
  stored["opt/0/mu/img/head/kernel"] = np.zeros(3, np.float32)
  path = _save(tmp_path, stored)
  with np.load(path) as raw:   # np.save really stores bfloat16 as void.
    assert raw["params/img/head/bias"].dtype.kind == "V"
  _, params = bv.load_npz(path)
  flat = _flatten(params)
  assert flat["connector/proj/bias"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      flat["connector/proj/bias"],
      ckpt["img/head/bias"].astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(flat["decoder/layers/mlp/gate/kernel"],
                                ckpt["llm/layers/mlp/gating_einsum"][:, 0])
  _, params32 = bv.load_npz(path, dtype=np.float32)
  assert all(v.dtype == np.float32 for v in _flatten(params32).values())


def test_missing_and_unexpected_keys(tmp_path):
  ckpt = _bv_checkpoint()
  del ckpt["llm/layers/pre_ffw_norm/scale"]
  ckpt["img/MAPHead_0/probe"] = np.zeros((1, 1, VIT["width"]), np.float32)
  with pytest.raises(bv.CheckpointLayoutError) as err:
    bv.load_npz(_save(tmp_path, ckpt))
  assert err.value.missing == ("llm/layers/pre_ffw_norm/scale",)
  assert err.value.unexpected == ("img/MAPHead_0/probe",)
  assert "llm/layers/pre_ffw_norm/scale" in str(err.value)
  assert "img/MAPHead_0/probe" in str(err.value)

  # Only one of Gemma 2's post norms: the other one is reported missing.
  ckpt = _bv_checkpoint(gemma2=True, kv_heads=2)
  del ckpt["llm/layers/post_ffw_norm/scale"]
  with pytest.raises(bv.CheckpointLayoutError, match="post_ffw_norm"):
    bv.load_npz(_save(tmp_path, ckpt, "g2.npz"))

  # An unscanned layer gap names the missing layer's keys.
  loop = _unscan(_bv_checkpoint())
  for k in [k for k in loop if k.startswith("llm/layers/1/")]:
    del loop[k]
  with pytest.raises(bv.CheckpointLayoutError,
                     match=r"llm/layers/1/mlp/linear"):
    bv.load_npz(_save(tmp_path, loop, "loop.npz"))

  with pytest.raises(bv.CheckpointLayoutError, match="no PaliGemma parameters"):
    bv.load_npz(_save(tmp_path, {"foo/bar": np.zeros(1)}, "empty.npz"))


def test_shape_mismatch_is_reported(tmp_path):
  ckpt = _bv_checkpoint()
  ckpt["llm/layers/pre_ffw_norm/scale"] = np.zeros((LLM["depth"], 7),
                                                   np.float32)
  with pytest.raises(bv.CheckpointLayoutError, match="pre_ffw_norm/scale"):
    bv.load_npz(_save(tmp_path, ckpt))


def test_variant_constants():
  """Constants chosen by matching sizes to big_vision's gemma.py variants."""
  def fields(name):
    v = bv.GEMMA_VARIANTS[name]
    return {k: v[k] for k in ("width", "depth", "mlp_dim", "num_heads",
                              "num_kv_heads", "head_dim", "post_norms")}
  assert bv.match_gemma_variant(fields("gemma2_9b")) == "gemma2_9b"
  c27 = bv.decoder_constants(fields("gemma2_27b"))
  # query_pre_attn_norm="rsqrt_emb_per_head": (4608 // 32)**-0.5 (L296-297).
  assert c27["query_pre_attn_scalar"] == 144.0
  assert (c27["attn_logit_softcap"], c27["final_logit_softcap"],
          c27["sliding_window"]) == (50.0, 30.0, 4096)
  c2b = bv.decoder_constants(fields("gemma2_2b"))
  assert c2b["query_pre_attn_scalar"] == 0.0 and c2b["sliding_window"] == 4096
  c1 = bv.decoder_constants(fields("gemma_2b"))
  assert (c1["attn_logit_softcap"], c1["final_logit_softcap"],
          c1["query_pre_attn_scalar"], c1["sliding_window"]) == (0, 0, 0, 0)


def test_converted_npz_loads_into_the_model(tmp_path):
  """convert -> from_pretrained: every parameter of the model is filled from
  the file (none missing, none left over), and the model runs."""
  ckpt = _bv_checkpoint(gemma2=True, kv_heads=2)
  with pytest.warns(UserWarning, match="no big_vision variant"):
    out = convert.convert("big_vision", _save(tmp_path, ckpt),
                          str(tmp_path / "ours"))
    _, params = bv.load_npz(_save(tmp_path, ckpt))
  model = pretrained.from_pretrained(out)
  state = nnx.to_pure_dict(nnx.state(model))
  flat = lambda tree, prefix="": (
      [kv for k, v in tree.items() for kv in flat(v, f"{prefix}{k}/")]
      if isinstance(tree, dict) else [(prefix[:-1], tree)])
  assert dict(flat(state)).keys() == dict(flat(params)).keys()
  for key, value in flat(params):
    np.testing.assert_array_equal(dict(flat(state))[key], value)
  size = model.config.vit.image_size
  logits = model(jnp.zeros((1, size, size, 3)), jnp.ones((1, 4), jnp.int32),
                 jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  assert logits.shape == (1, 4, LLM["vocab"]) and np.isfinite(logits).all()


def test_big_vision_and_hf_files_of_one_model_convert_alike(tmp_path):
  """The tiny PaliGemma saved both ways converts to the same fields and
  parameters, except the embedding's rows: Hugging Face's are padded."""
  hf_dir = str(tmp_path / "hf")
  tiny_paligemma.random_hf_model().save_pretrained(hf_dir)
  npz = tiny_paligemma.write_big_vision_npz(hf_dir, str(tmp_path / "bv.npz"))
  hf_fields, hf_params = hf_paligemma.load(hf_dir)
  bv_fields, bv_params = bv.load_npz(npz)
  hf_config, bv_config = (build.vlm_config(build.shape_fields("x", f))
                          for f in (hf_fields, bv_fields))
  assert hf_config.decoder.vocab_size == tiny_paligemma.VOCAB_SIZE
  assert bv_config.decoder.vocab_size == tiny_paligemma.SP_PIECES
  assert bv_config == dataclasses.replace(
      hf_config, decoder=dataclasses.replace(
          hf_config.decoder, vocab_size=tiny_paligemma.SP_PIECES))
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  hf_flat, bv_flat = flat(hf_params), flat(bv_params)
  assert hf_flat.keys() == bv_flat.keys()
  for key, value in bv_flat.items():
    np.testing.assert_allclose(value, hf_flat[key][:len(value)], rtol=1e-6,
                               err_msg=jax.tree_util.keystr(key))
