"""Imports big_vision PaliGemma / PaliGemma 2 `.npz` checkpoints.

`load_npz(path)` reads a checkpoint written by big_vision (a released
`pt_224.npz`, ... or one of its fine-tuning runs) and returns
`(config_fields, params)`: our `VLMConfig`'s sizes, inferred from the array
shapes, and our parameter tree (nested numpy dicts, layers stacked). Only
numpy and ml_dtypes are needed; each array is read from the zip once.

Everything below was established from google-research/big_vision (commit
0127fb6b337ee2a27bf4e54dea79cff176527356) unless said otherwise; "L"
numbers are lines of that commit.

File format (big_vision/utils.py)
---------------------------------
* An `.npz` of the flattened parameter tree; names are the nested-dict path
  joined with "/" (`tree_flatten_with_names`, L616-657; the inverse
  `recover_tree`, L836-862, splits on "/").
* `load_params` (L172-227) accepts three roots: `params/...`,
  `opt/target/...` (old Flax optimizer) and the bare tree (released
  checkpoints). So do we, ignoring everything outside the chosen root.
* bfloat16 arrays come back from `np.load` as the void dtype `V2`, which
  `recover_dtype` (L827-833) views as bfloat16, as we do.
* PaliGemma is `proj/paligemma/paligemma.py`: the image tower is module `img`
  and the LLM `llm` (L61-69); `paligemma.load` reads `<file>:img` and
  `<file>:llm` from one npz (L277-295).

Image tower `img/` (big_vision/models/vit.py, with pool_type="none", scan=True:
configs/proj/paligemma/transfers/forkme.py L135). Shapes per layer; scanned
layers carry a leading depth axis.
--------------------------------------------------------------------------
  img/embedding/kernel        [p, p, 3, Wv]  nn.Conv "embedding", L212-214
  img/embedding/bias          [Wv]
  img/pos_embedding           [1, N, Wv]     get_posemb "learn", L47-50, L220
  img/Transformer/encoderblock/...      scanned: nn.scan with
                              variable_axes={"params": 0}, name
                              "encoderblock", L129-146
  img/Transformer/encoderblock_{i}/...  unscanned (L150-157); vit.load
                              converts between both (pyloop_to_scan L363-386)
    LayerNorm_0/{scale,bias}  [Wv]  pre-attention norm, L92
    MultiHeadDotProductAttention_0/     flax MHDPA, L93-98:
      {query,key,value}/kernel [Wv, H, hd], bias [H, hd]
      out/kernel              [H, hd, Wv], bias [Wv]
    LayerNorm_1/{scale,bias}  [Wv]  pre-MLP norm, L103
    MlpBlock_0/Dense_0/{kernel,bias}  [Wv, M], [M]   L72
    MlpBlock_0/Dense_1/{kernel,bias}  [M, Wv], [Wv]  L77 (gelu between, L75)
  img/Transformer/encoder_norm/{scale,bias}  [Wv]    L160
  img/head/{kernel,bias}      [Wv, Wd], [Wd]  nn.Dense "head", L270-274, with
                              num_classes = llm width (paligemma.py L66): the
                              linear projection (our connector).
The shapes (as scanned) are also printed by big_vision's own
configs/proj/paligemma/finetune_paligemma.ipynb (parameter listing of a
PaliGemma 2 3B checkpoint, e.g. `query/kernel (27, 1152, 16, 72)`).

Language model `llm/` (big_vision/models/ppp/gemma.py, wrapped by
proj/paligemma/gemma_bv.py, which attaches it without an extra level:
`parent=self.scope, name=""`, gemma_bv.py L67-69)
----------------------------------------------------------------
  llm/embedder/input_embedding  [V, Wd]  Embedder, L225-238, L481-484
  llm/layers/...              scanned: nn.scan, variable_axes {"params": 0},
                              L542-553
  llm/layers/{i}/...          unscanned: layers.push(str(layer)), L555-561
    pre_attention_norm/scale  [Wd]  L383
    attn/q_einsum/w           [H, Wd, hd]     when K != H, L270-274
    attn/kv_einsum/w          [2, K, Wd, hd]  L275-279; [0]=k, [1]=v (L291)
    attn/qkv_einsum/w         [3, H, Wd, hd]  when K == H (gemma_7b),
                              L263-268; [0]=q, [1]=k, [2]=v (L288)
    attn/attn_vec_einsum/w    [H, hd, Wd]  L280-283, "BTNH,NHD->BTD" L331
    post_attention_norm/scale [Wd]  Gemma 2 only (post_norms), L399-401
    pre_ffw_norm/scale        [Wd]  L393
    mlp/gating_einsum         [2, Wd, M]  L344-348: [0] is the gate (gelu'd,
                              L349-350), [1] the up projection (L352-353)
    mlp/linear                [M, Wd]  L355-359
    post_ffw_norm/scale       [Wd]  Gemma 2 only, L399-401
  llm/final_norm/scale        [Wd]  L570
Note that `gating_einsum` and `linear` hold the array directly (no `/w`). Some
original Gemma checkpoints store gating_einsum as [2, M, Wd]; gemma.py detects
that by `d1 > d2` (`_maybe_transpose_gating_einsum`, L609-616) and we apply the
same rule, which is right because Gemma's M is always larger than Wd.

Conversion to our tree
----------------------
* conv kernel [p, p, 3, Wv] -> [p*p*3, Wv] by a C-order reshape, i.e. the
  (row, column, channel) order of `omnismola.models.vit.patchify`.
* pos_embedding [1, N, Wv] -> [N, Wv]; image_size = sqrt(N) * p.
* ViT q/k/v kernel [Wv, H, hd] -> [Wv, H*hd], bias [H, hd] -> [H*hd];
  out kernel [H, hd, Wv] -> [H*hd, Wv]. flax scales queries by hd**-0.5 like
  our `attend`.
* q_einsum [H, Wd, hd] -> transpose -> [Wd, H, hd] -> [Wd, H*hd]: column
  h*hd + d, heads-major (the einsum "BTD,NDH->BTNH", L290). k/v likewise with
  K heads. Query head n reads kv head n // (H/K) in both (L309).
* attn_vec_einsum [H, hd, Wd] -> [H*hd, Wd].
* norm scales are copied: big_vision's RMSNorm computes x * (1 + scale)
  (L214-222) as ours does, and flax LayerNorm uses scale directly like ours.

Config fields
-------------
Every size is inferred from the shapes; Gemma 2 is recognised by the post
norms. Not inferable from the weights, so taken as constants:

* rope_max_wavelength = 10_000: `_apply_rope`'s default (L148), never
  overridden (L293, L303).
* norm_eps = 1e-6: hard-coded in RMSNorm (L220); every variant says 1e-6.
  (ViT LayerNorm: flax's default 1e-6, which is our LayerNorm's default.)
* Gemma 1: no softcaps, queries scaled by head_dim**-0.5
  (query_pre_attn_norm="rsqrt_head_dim", the default, L437), no sliding
  window, no post norms.
* Gemma 2: the constants of the big_vision variant (`get_config`, L87-144)
  whose sizes match: softcaps 50.0 / 30.0 and, for gemma2_27b,
  query_pre_attn_norm="rsqrt_emb_per_head", i.e. queries scaled by
  (width // num_heads)**-0.5 (L296-297) -> query_pre_attn_scalar = 144.0.
  No variant matching: the same with head_dim scaling, and a warning.
* sliding_window = 4096 for Gemma 2. big_vision itself does NOT implement
  Gemma 2's local attention (gemma.py docstring, L33-37, "since we mostly use
  sequences <4096 tokens, this shouldn't make any difference"); 4096 on
  alternating layers starting with layer 0 is Gemma 2's reference setting
  (google-deepmind/gemma, gemma/gm/nn/_gemma.py, Gemma2_2B/9B/27B:
  attention_types=(LOCAL_SLIDING, GLOBAL) * (layers/2),
  sliding_window_size=4096). It only matters past 4096 tokens.
* final_logit_softcap: the variant's 30.0, though big_vision's PaliGemma 2
  transfer recipe sets 0.0 ("Better for transfer", forkme.py L147).
"""
import math
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from omnismola import storage

__all__ = ["CheckpointLayoutError", "load_npz", "convert", "GEMMA_VARIANTS",
           "match_gemma_variant", "decoder_constants"]

# big_vision/models/ppp/gemma.py get_config (L53-145): the sizes used to
# recognise a variant and the constants that cannot be read off the weights.
GEMMA_VARIANTS = {
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16_384, num_heads=8,
                     num_kv_heads=1, head_dim=256, post_norms=False),
    "gemma_7b": dict(width=3072, depth=28, mlp_dim=24_576, num_heads=16,
                     num_kv_heads=16, head_dim=256, post_norms=False),
    "gemma2_2b": dict(width=2304, depth=26, mlp_dim=9_216, num_heads=8,
                      num_kv_heads=4, head_dim=256, post_norms=True,
                      final_logits_softcap=30.0, attn_logits_softcap=50.0),
    "gemma2_9b": dict(width=3584, depth=42, mlp_dim=14_336, num_heads=16,
                      num_kv_heads=8, head_dim=256, post_norms=True,
                      final_logits_softcap=30.0, attn_logits_softcap=50.0),
    "gemma2_27b": dict(width=4608, depth=46, mlp_dim=36_864, num_heads=32,
                       num_kv_heads=16, head_dim=128, post_norms=True,
                       query_pre_attn_norm="rsqrt_emb_per_head",
                       final_logits_softcap=30.0, attn_logits_softcap=50.0),
}
_SIZE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads",
                "head_dim", "post_norms")
ROPE_MAX_WAVELENGTH = 10_000.0   # gemma.py _apply_rope default (L148).
NORM_EPS = 1e-6                  # gemma.py RMSNorm (L220).
GEMMA2_SLIDING_WINDOW = 4096     # google-deepmind/gemma Gemma2_* configs.

# The roots big_vision's utils.load_params accepts (L206-214), in its order.
_ROOTS = ("params/", "opt/target/", "")

_VIT_LAYER_KEYS = (
    "LayerNorm_0/scale", "LayerNorm_0/bias",
    *(f"MultiHeadDotProductAttention_0/{m}/{p}"
      for m in ("query", "key", "value", "out") for p in ("kernel", "bias")),
    "LayerNorm_1/scale", "LayerNorm_1/bias",
    "MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_0/bias",
    "MlpBlock_0/Dense_1/kernel", "MlpBlock_0/Dense_1/bias",
)
_VIT_TOP_KEYS = ("img/embedding/kernel", "img/embedding/bias",
                 "img/pos_embedding", "img/Transformer/encoder_norm/scale",
                 "img/Transformer/encoder_norm/bias", "img/head/kernel",
                 "img/head/bias")
_LLM_TOP_KEYS = ("llm/embedder/input_embedding", "llm/final_norm/scale")
_LLM_LAYER_COMMON = ("pre_attention_norm/scale", "attn/attn_vec_einsum/w",
                     "pre_ffw_norm/scale", "mlp/gating_einsum", "mlp/linear")
_LLM_QKV_SEPARATE = ("attn/q_einsum/w", "attn/kv_einsum/w")
_LLM_QKV_FUSED = ("attn/qkv_einsum/w",)
_LLM_POST_NORMS = ("post_attention_norm/scale", "post_ffw_norm/scale")


class CheckpointLayoutError(ValueError):
  """The checkpoint's keys or shapes are not big_vision's PaliGemma layout."""

  def __init__(self, message: str, *, missing=(), unexpected=()):
    self.missing = tuple(missing)
    self.unexpected = tuple(unexpected)
    parts = [message]
    if self.missing:
      parts.append("missing keys: " + _fmt_keys(self.missing))
    if self.unexpected:
      parts.append("unexpected keys: " + _fmt_keys(self.unexpected))
    super().__init__("\n  ".join(parts))


def _fmt_keys(keys, limit=40):
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)"
                  if len(keys) > limit else "")


def _recover_dtype(a: np.ndarray, dtype) -> np.ndarray:
  """Views np.save's 'V2' (bfloat16) as bfloat16, then casts to `dtype`."""
  if a.dtype.kind == "V":
    if a.dtype.itemsize != 2:
      raise CheckpointLayoutError(f"unknown void dtype {a.dtype} (only "
                                  "bfloat16 stored as V2 is known)")
    a = a.view(ml_dtypes.bfloat16)
  if dtype is not None and a.dtype != np.dtype(dtype):
    a = a.astype(dtype)
  return a


def _layers(keys: set[str], scan_prefix: str, loop_stem: str):
  """How the checkpoint stores a tower's layers: ("scan", [scan_prefix]) or
  ("loop", [f"{loop_stem}{i}/" for every layer i])."""
  loop = re.compile(re.escape(loop_stem) + r"(\d+)/")
  matches = {k: loop.match(k) for k in keys}
  indices = {int(m.group(1)) for m in matches.values() if m}
  if not indices or any(k.startswith(scan_prefix) and not m
                        for k, m in matches.items()):
    return "scan", [scan_prefix]
  return "loop", [f"{loop_stem}{i}/" for i in range(max(indices) + 1)]


def _layout(keys: set[str]):
  """(vit_layers, llm_layers, (fused_qkv, post_norms), expected keys): the
  layer layouts (as `_layers` returns) and the keys the checkpoint must
  have."""
  expected = set(_VIT_TOP_KEYS) | set(_LLM_TOP_KEYS)
  # Scanned "encoderblock/..." or python-loop "encoderblock_{i}/...".
  vit_layers = _layers(keys, "img/Transformer/encoderblock/",
                       "img/Transformer/encoderblock_")
  for prefix in vit_layers[1]:
    expected.update(prefix + k for k in _VIT_LAYER_KEYS)
  # Scanned "layers/<module>" or python-loop "layers/{i}/<module>".
  llm_layers = _layers(keys, "llm/layers/", "llm/layers/")
  first = llm_layers[1][0]
  fused = (first + _LLM_QKV_FUSED[0]) in keys
  post_norms = any(first + k in keys for k in _LLM_POST_NORMS)
  per_layer = (_LLM_LAYER_COMMON
               + (_LLM_QKV_FUSED if fused else _LLM_QKV_SEPARATE)
               + (_LLM_POST_NORMS if post_norms else ()))
  for prefix in llm_layers[1]:
    expected.update(prefix + k for k in per_layer)
  return vit_layers, llm_layers, (fused, post_norms), expected


def _choose_root(names) -> tuple[str, set[str]]:
  names = list(names)
  for root in _ROOTS:
    if any(n.startswith((root + "img/", root + "llm/")) for n in names):
      return root, {n[len(root):] for n in names if n.startswith(root)}
  raise CheckpointLayoutError(
      "no PaliGemma parameters found: expected keys under 'img/' and 'llm/' "
      "(optionally below 'params/' or 'opt/target/'); the file has "
      + _fmt_keys(names, limit=10))


def _check_shape(key: str, arr: np.ndarray, shape: tuple,
                 sizes: dict[str, int]) -> np.ndarray:
  """`arr`, after checking its shape against `shape`: ints, and names of
  sizes that `sizes` holds or, where a name first appears, takes from `arr`.
  """
  found = dict(sizes)
  fits = arr.ndim == len(shape) and all(
      dim == (found.setdefault(want, dim) if isinstance(want, str) else want)
      for dim, want in zip(arr.shape, shape))
  if not fits:
    expected = ", ".join(str(sizes.get(d, d)) for d in shape)
    raise CheckpointLayoutError(
        f"{key}: shape {tuple(arr.shape)}, expected [{expected}] "
        "(from the other arrays of the checkpoint)")
  sizes.update(found)
  return arr


def _stacked(read: Callable[[str], np.ndarray], layers, key: str):
  """[D, ...] for one per-layer key, reading a scanned or looped layout."""
  kind, prefixes = layers
  if kind == "scan":
    return read(prefixes[0] + key)
  parts = [read(p + key) for p in prefixes]
  for p, a in zip(prefixes, parts):
    _check_shape(p + key, a, parts[0].shape, {})
  return np.stack(parts)


def match_gemma_variant(decoder: Mapping[str, Any]) -> str | None:
  """The big_vision Gemma variant with exactly these sizes, or None."""
  for name, variant in GEMMA_VARIANTS.items():
    if all(decoder[f] == variant[f] for f in _SIZE_FIELDS):
      return name
  return None


def decoder_constants(decoder: Mapping[str, Any]) -> dict[str, Any]:
  """The fields that the weights do not determine (see module docstring)."""
  consts = dict(rope_max_wavelength=ROPE_MAX_WAVELENGTH, norm_eps=NORM_EPS,
                attn_logit_softcap=0.0, final_logit_softcap=0.0,
                query_pre_attn_scalar=0.0, sliding_window=0)
  if not decoder["post_norms"]:
    return consts
  name = match_gemma_variant(decoder)
  if name is None:
    warnings.warn(
        "Gemma 2 checkpoint whose sizes match no big_vision variant "
        f"({', '.join(GEMMA_VARIANTS)}); using gemma2_2b/9b constants: "
        "softcaps 50/30, queries scaled by head_dim**-0.5, sliding window "
        f"{GEMMA2_SLIDING_WINDOW}.", stacklevel=3)
  variant = GEMMA_VARIANTS[name or "gemma2_2b"]
  consts.update(attn_logit_softcap=variant["attn_logits_softcap"],
                final_logit_softcap=variant["final_logits_softcap"],
                sliding_window=GEMMA2_SLIDING_WINDOW)
  if variant.get("query_pre_attn_norm") == "rsqrt_emb_per_head":
    consts["query_pre_attn_scalar"] = float(
        decoder["width"] // decoder["num_heads"])
  return consts


def convert(arrays: Mapping[str, Any], *, dtype=None,
            source: str = "checkpoint") -> tuple[dict, dict]:
  """`load_npz`'s result from a flat big_vision name -> array mapping (e.g.
  an NpzFile, each key read once), named `source` in error messages."""
  names = list(getattr(arrays, "files", None) or arrays.keys())
  root, keys = _choose_root(names)
  vit_layers, llm_layers, (fused, post_norms), expected = _layout(keys)
  missing, unexpected = expected - keys, keys - expected
  if missing or unexpected:
    raise CheckpointLayoutError(
        f"{source} (root {root or '<top>'!r}) is not big_vision's PaliGemma "
        "layout", missing=[root + k for k in missing],
        unexpected=[root + k for k in unexpected])

  def read(key: str) -> np.ndarray:
    """Reads one array of the chosen root (once), recovering bfloat16."""
    return _recover_dtype(np.asarray(arrays[root + key]), dtype)

  # Named sizes, each taken from the first array that shows it and checked
  # against every later one (_check_shape).
  sizes = {}
  top = lambda key, *shape: _check_shape(key, read(key), shape, sizes)
  vit_get = lambda key, *shape: _check_shape(
      f"ViT {key} (stacked)", _stacked(read, vit_layers, key),
      ("vit_depth", *shape), sizes)
  llm_get = lambda key, *shape: _check_shape(
      f"llm {key} (stacked)", _stacked(read, llm_layers, key),
      ("depth", *shape), sizes)

  # ---- ViT -----------------------------------------------------------------
  conv = top("img/embedding/kernel", "patch", "patch", 3, "vit_width")
  patch, _, _, vit_width = conv.shape
  pos = top("img/pos_embedding", 1, "positions", "vit_width")
  grid = math.isqrt(pos.shape[1])
  if grid * grid != pos.shape[1]:
    raise CheckpointLayoutError(f"img/pos_embedding: {pos.shape[1]} "
                                "positions is not a square grid")
  attn = "MultiHeadDotProductAttention_0/"
  head_shape = ("vit_width", "vit_heads", "vit_hd")
  query = vit_get(attn + "query/kernel", *head_shape)
  vit_depth, _, vit_heads, vit_hd = query.shape
  if vit_heads * vit_hd != vit_width:
    raise CheckpointLayoutError(
        f"ViT heads {vit_heads} x head_dim {vit_hd} != width {vit_width}")
  fc1 = vit_get("MlpBlock_0/Dense_0/kernel", "vit_width", "vit_mlp")
  vit_mlp = fc1.shape[-1]
  head_kernel = top("img/head/kernel", "vit_width", "width")
  width = head_kernel.shape[1]

  qkv_dim = vit_heads * vit_hd
  vit_attn = {}
  for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
    kernel = query if ours == "q" else vit_get(f"{attn}{theirs}/kernel",
                                               *head_shape)
    bias = vit_get(f"{attn}{theirs}/bias", "vit_heads", "vit_hd")
    vit_attn[ours] = dict(
        kernel=kernel.reshape(vit_depth, vit_width, qkv_dim),
        bias=bias.reshape(vit_depth, qkv_dim))
  vit_attn["o"] = dict(
      kernel=vit_get(f"{attn}out/kernel", "vit_heads", "vit_hd", "vit_width"
                     ).reshape(vit_depth, qkv_dim, vit_width),
      bias=vit_get(f"{attn}out/bias", "vit_width"))
  norm = lambda name: {p: vit_get(f"{name}/{p}", "vit_width")
                       for p in ("scale", "bias")}
  vit = dict(
      embedding=dict(kernel=conv.reshape(patch * patch * 3, vit_width),
                     bias=top("img/embedding/bias", "vit_width")),
      pos_embedding=pos.reshape(pos.shape[1], vit_width),
      layers=dict(
          norm1=norm("LayerNorm_0"),
          attn=vit_attn,
          norm2=norm("LayerNorm_1"),
          mlp=dict(
              fc1=dict(kernel=fc1,
                       bias=vit_get("MlpBlock_0/Dense_0/bias", "vit_mlp")),
              fc2=dict(kernel=vit_get("MlpBlock_0/Dense_1/kernel",
                                      "vit_mlp", "vit_width"),
                       bias=vit_get("MlpBlock_0/Dense_1/bias",
                                    "vit_width")))),
      norm={p: top(f"img/Transformer/encoder_norm/{p}", "vit_width")
            for p in ("scale", "bias")},
  )
  connector = dict(proj=dict(kernel=head_kernel,
                             bias=top("img/head/bias", "width")))

  # ---- LLM -----------------------------------------------------------------
  embedding = top("llm/embedder/input_embedding", "vocab", "width")
  if fused:
    qkv = llm_get("attn/qkv_einsum/w", 3, "heads", "width", "head_dim")
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]       # gemma.py L288.
    sizes["kv_heads"] = sizes["heads"]
    del qkv
  else:
    q = llm_get("attn/q_einsum/w", "heads", "width", "head_dim")
    kv = llm_get("attn/kv_einsum/w", 2, "kv_heads", "width", "head_dim")
    k, v = kv[:, 0], kv[:, 1]                       # gemma.py L291.
    del kv
  depth, heads, kv_heads, head_dim = (
      sizes[name] for name in ("depth", "heads", "kv_heads", "head_dim"))
  if heads % kv_heads:
    raise CheckpointLayoutError(
        f"llm: kv_heads {kv_heads} does not divide heads {heads}")

  def heads_major(w, n):  # [D, n, Wd, hd] -> [D, Wd, n*hd], column h*hd + d.
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3)).reshape(
        depth, width, n * head_dim)

  gating = _stacked(read, llm_layers, "mlp/gating_einsum")
  if gating.ndim == 4 and gating.shape[2] > gating.shape[3]:
    gating = gating.transpose(0, 1, 3, 2)  # gemma.py L609-616: [2, M, Wd].
  _check_shape("llm mlp/gating_einsum (stacked)", gating,
               ("depth", 2, "width", "mlp_dim"), sizes)
  mlp_dim = gating.shape[3]
  layers = dict(
      pre_attn_norm=dict(scale=llm_get("pre_attention_norm/scale", "width")),
      attn=dict(
          q=dict(kernel=heads_major(q, heads)),
          k=dict(kernel=heads_major(k, kv_heads)),
          v=dict(kernel=heads_major(v, kv_heads)),
          o=dict(kernel=llm_get("attn/attn_vec_einsum/w", "heads",
                                "head_dim", "width"
                                ).reshape(depth, heads * head_dim, width))),
      pre_mlp_norm=dict(scale=llm_get("pre_ffw_norm/scale", "width")),
      mlp=dict(
          gate=dict(kernel=np.ascontiguousarray(gating[:, 0])),  # L349-350
          up=dict(kernel=np.ascontiguousarray(gating[:, 1])),    # L352-353
          down=dict(kernel=llm_get("mlp/linear", "mlp_dim", "width"))),
  )
  del q, k, v, gating
  if post_norms:
    layers["post_attn_norm"] = dict(
        scale=llm_get("post_attention_norm/scale", "width"))
    layers["post_mlp_norm"] = dict(
        scale=llm_get("post_ffw_norm/scale", "width"))
  decoder = dict(
      embedder=dict(embedding=embedding),
      layers=layers,
      final_norm=dict(scale=top("llm/final_norm/scale", "width")),
  )

  decoder_fields = dict(vocab_size=embedding.shape[0], width=width, depth=depth,
                        num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=head_dim, mlp_dim=mlp_dim,
                        post_norms=post_norms)
  decoder_fields.update(decoder_constants(decoder_fields))
  config = dict(
      vit=dict(image_size=grid * patch, patch_size=patch, width=vit_width,
               depth=vit_depth, num_heads=vit_heads, mlp_dim=vit_mlp),
      decoder=decoder_fields,
      connector="linear",
  )
  params = dict(vit=vit, connector=connector, decoder=decoder)
  return config, params


def load_npz(path, *, dtype=None) -> tuple[dict, dict]:
  """Loads a big_vision PaliGemma (1 or 2) `.npz` checkpoint.

  Args:
    path: the `.npz` file, a local path or a storage URL.
    dtype: optional dtype for every array (e.g. np.float32); by default the
      stored dtypes are kept (bfloat16 as `ml_dtypes.bfloat16`).

  Returns:
    (config_fields, params): {"vit": {the ViTConfig sizes}, "decoder":
    {every DecoderConfig field}, "connector": "linear"} and {"vit",
    "connector", "decoder": nested dicts of numpy arrays, layers stacked}.

  Raises:
    CheckpointLayoutError: keys missing or unexpected (both listed), or shapes
      that do not fit together.
  """
  # The archive reads its members from the open file as they are used.
  with storage.path(path).open("rb") as f:
    if not zipfile.is_zipfile(f):
      raise CheckpointLayoutError(f"{path} is not an .npz archive (a zip of "
                                  ".npy arrays, as big_vision writes).")
    f.seek(0)
    with np.load(f, allow_pickle=False) as npz:
      return convert(npz, dtype=dtype, source=str(path))
