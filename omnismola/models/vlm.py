"""The vision-language model: ViT -> connector -> prefix-LM decoder.

The decoder reads one sequence: the image tokens first, then the text tokens.
Attention follows big_vision's prefix-LM rule: with `cum = cumsum(mask_ar)`,
query q may attend to key k iff `cum[k] <= cum[q]` and both are valid. Image
tokens have mask_ar 0 and are always valid, so they and the text prefix
(mask_ar 0) see each other bidirectionally while the suffix (mask_ar 1) is
causal. RoPE positions count valid tokens only (`cumsum(valid) - 1`), so
padding anywhere never shifts the positions of real tokens, and cached
decoding with per-example prompt lengths continues each example's own count.

`forward` returns the logits and what the routers reported; `__call__`
the logits only. Cached decoding (`prefill`, `extend`) drops the reports.
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from omnismola.models.connectors import MoVEConfig, make_connector
from omnismola.models.decoder import (Decoder, DecoderConfig, KVCache,
                                      sliding_window_mask)
from omnismola.models import layers
from omnismola.models import stack
from omnismola.models.layers import TokenInfo
from omnismola.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """Vision encoder(s), a connector kind (`connectors.CONNECTORS`) and a
  decoder.

  `vit` is the primary encoder (module `vit`, so PaliGemma checkpoints load);
  `extra_vits` (modules `vit_1`, ...) only the `move` connector mixes,
  with `move` its options (docs/models.md). `remat_policy` and
  `scan_layers` apply to every tower (`stack.LayerLoop`).
  """
  vit: ViTConfig
  decoder: DecoderConfig
  connector: str = "linear"
  remat_policy: str = "none"
  scan_layers: bool = True
  extra_vits: tuple[ViTConfig, ...] = ()
  move: MoVEConfig = MoVEConfig()

  @property
  def layer_loop(self) -> stack.LayerLoop:
    return stack.LayerLoop(self.remat_policy, self.scan_layers)

  def __post_init__(self):
    stack.LayerLoop(self.remat_policy, self.scan_layers)  # Checks both.
    if self.connector == "move" and not self.extra_vits:
      raise ValueError("model.connector='move' mixes two or more vision "
                       "encoders, but model.extra_vits is empty: add at "
                       "least one encoder there (configs/mome.py).")
    if self.extra_vits and self.connector != "move":
      raise ValueError(f"model.extra_vits holds {len(self.extra_vits)} "
                       "extra vision encoder(s), which only "
                       "model.connector='move' mixes; got "
                       f"model.connector={self.connector!r}.")

  @property
  def encoders(self) -> dict[str, ViTConfig]:
    """The vision encoders by module name: `vit`, `vit_1`, `vit_2`, ..."""
    extra = {f"vit_{i}": vit for i, vit in enumerate(self.extra_vits, 1)}
    return {"vit": self.vit, **extra}

  @property
  def num_image_tokens(self) -> int:
    """Image tokens in front of the text: what the connector outputs."""
    if self.connector == "move":
      return self.move.num_tokens or self.vit.num_patches
    return self.vit.num_patches


def filled_slots(segment_ids: jax.Array, num_images: int) -> jax.Array:
  """bool [B, M]: the image slots of packed rows that hold an example
  (segment m + 1 has text tokens; `segment_ids` [B, L] is 0 on padding)."""
  return jnp.any(segment_ids[:, :, None] == jnp.arange(1, num_images + 1),
                 axis=1)


def sequence_layout(num_image_tokens: int, mask_ar: jax.Array,
                    mask_input: jax.Array, segment_ids: jax.Array | None = None,
                    num_images: int = 1):
  """TokenInfo, attention mask and positions of [image tokens, text].

  A row holds one example, or with `segment_ids` up to `num_images` packed
  examples: all their images' tokens first (image m's N tokens at
  [m N, (m + 1) N)), then their texts one after another. Example m is
  segment m + 1; tokens attend within their own segment only, by the
  prefix-LM rule applied per segment, and positions restart at 0 for each
  image, so every example computes as it would alone in a row.

  Args:
    num_image_tokens: N, the tokens of one image.
    mask_ar: int [B, L], 0 for prefix text, 1 for suffix text.
    mask_input: int [B, L], 1 for real text tokens, 0 for padding.
    segment_ids: int [B, L] or None (one example per row): the text token's
      segment (1 to `num_images`, 0 on padding).
    num_images: M, the image slots per row; a slot whose segment has no
      text is empty (its image tokens are invalid).

  Returns:
    (tokens: TokenInfo [B, M N + L] with each token's `segment`, mask: bool
     [B, M N + L, M N + L], positions: int32 [B, M N + L]).
  """
  text_valid = mask_input.astype(bool)
  # Each text token's segment (0 on padding) and each image slot's (0: an
  # empty slot).
  if segment_ids is None:
    text_segment = text_valid.astype(jnp.int32)
    slots = jnp.ones((text_segment.shape[0], 1), jnp.int32)
  else:
    text_segment = jnp.where(text_valid, segment_ids, 0).astype(jnp.int32)
    slots = jnp.where(filled_slots(text_segment, num_images),
                      jnp.arange(1, num_images + 1), 0)
  num_slots = slots.shape[1]
  image_segment = jnp.repeat(slots, num_image_tokens, axis=1)
  # Per-segment totals [B, M + 1] (segment 0 is padding), to restart the
  # causal count and the positions at each segment's first text token.
  in_segment = (text_segment[:, :, None] ==
                jnp.arange(num_slots + 1)).astype(jnp.int32)

  def count_before_segment(per_token):
    """int [B, L]: `per_token` summed over the segments before each text
    token's own (segments follow each other in id order)."""
    per_segment = jnp.sum(in_segment * per_token[:, :, None], axis=1)
    exclusive = jnp.cumsum(per_segment, axis=1) - per_segment
    return jnp.take_along_axis(exclusive, text_segment, axis=1)

  text_ar = mask_ar.astype(jnp.int32) * text_valid
  text_cum = jnp.cumsum(text_ar, axis=1) - count_before_segment(text_ar)
  text_count = text_valid.astype(jnp.int32)
  text_positions = (num_image_tokens + jnp.cumsum(text_count, axis=1) - 1 -
                    count_before_segment(text_count))

  filled = image_segment > 0  # An empty slot's tokens are not valid.
  image = TokenInfo(is_image=jnp.ones_like(filled), valid=filled,
                    bidirectional=filled)
  segment = jnp.concatenate([image_segment, text_segment], axis=1)
  tokens = TokenInfo.concat([
      image, TokenInfo.text(valid=text_valid, bidirectional=text_cum == 0)
  ]).replace(segment=segment, num_segments=num_slots)
  cum = jnp.concatenate([jnp.zeros_like(image_segment), text_cum], axis=1)
  mask = ((segment[:, None, :] == segment[:, :, None]) &
          (segment > 0)[:, None] & (cum[:, None, :] <= cum[:, :, None]))
  positions = jnp.concatenate([
      jnp.broadcast_to(jnp.tile(jnp.arange(num_image_tokens), num_slots),
                       image_segment.shape),
      text_positions], axis=1).astype(jnp.int32)
  return tokens, mask, positions


def segment_means(x: jax.Array, segment: jax.Array,
                  num_segments: int) -> jax.Array:
  """float32 [B, S, D]: the mean of x [B, T, D] over each segment's
  positions, `segment` int [B, T] in 1..S (0: in none); zeros for a segment
  without positions."""
  member = (segment[:, :, None] ==
            jnp.arange(1, num_segments + 1)).astype(jnp.float32)
  total = jnp.einsum("bts,btd->bsd", member, x.astype(jnp.float32))
  return total / jnp.maximum(jnp.sum(member, axis=1), 1.0)[..., None]


def resize_image(image: jax.Array, size: int) -> jax.Array:
  """[B, H, W, 3] -> [B, size, size, 3], bilinear with antialiasing (as
  the data pipeline resizes); the image itself if it has that size."""
  if image.shape[1:3] == (size, size):
    return image
  return jax.image.resize(image, (image.shape[0], size, size, 3),
                          method="bilinear", antialias=True)


class DecoderRun(NamedTuple):
  """What one run of the decoder over [image tokens, text] gives back."""
  hidden: jax.Array        # [B, M N + L, width], the final hidden states.
  tokens: TokenInfo        # Each token's kind, validity and instance vector.
  positions: jax.Array     # int [B, M N + L], RoPE positions.
  kv: Any                  # (k, v) of the filled cache, or None.
  reports: dict            # What the routers reported (`forward`).


class VLM(nnx.Module):
  """PaliGemma-style VLM with the experts `plan` attaches (`build.py` makes
  it from `config.experts`; the default attaches none)."""

  def __init__(self, config: VLMConfig, *, plan: stack.Plan = stack.Plan(),
               rngs: nnx.Rngs):
    self.config = config
    for name, encoder in config.encoders.items():
      setattr(self, name, ViT(encoder, plan=plan.child(name),
                              loop=config.layer_loop, rngs=rngs))
    self.connector = make_connector(
        config.connector, config.encoders, config.decoder.width,
        move=config.move, plan=plan.child("connector"),
        loop=config.layer_loop, rngs=rngs)
    self.decoder = Decoder(config.decoder, plan=plan.child("decoder"),
                           loop=config.layer_loop, rngs=rngs)
    # The towers' layers got theirs as they were stacked.
    plan.attach(self, plan.prefix, rngs)

  @property
  def num_image_tokens(self) -> int:
    return self.config.num_image_tokens

  def embed_image(self, image: jax.Array, instance: jax.Array | None = None,
                  rows: jax.Array | None = None):
    """[B, H, W, 3] -> (decoder-width image tokens [B, N, width], what the
    routers of the encoders and the connector reported).

    Every encoder encodes the image (resized to its `image_size`), the
    connector maps their features to the N image tokens. `instance`
    ([B, width] or None), the mean embedding of the prompt's text, reaches
    the image side's instance routers; `rows` (bool [B] or None: all) marks
    the real images (not the empty slots of packed rows).
    """
    batch = image.shape[0]
    features, reports = [], {}
    for name, encoder in self.config.encoders.items():
      # The primary encoder takes the image as given (and checks its size).
      image_in = (image if name == "vit" else
                  resize_image(image, encoder.image_size))
      x, encoder_reports = getattr(self, name)(
          image_in, TokenInfo.image(batch, encoder.num_patches, instance,
                                    rows))
      features.append(x)
      reports.update(encoder_reports)
    tokens = TokenInfo.image(batch, self.num_image_tokens, instance, rows)
    x, connector_reports = self.connector(tuple(features), tokens)
    # Routers outside scanned layers (the connector's MoE) are still sown.
    return x, {**reports, **connector_reports, **layers.pop_reports(self)}

  def _run_sequence(self, image, text, mask_ar, mask_input, segment_ids=None,
                    free_slots=0, kv=None):
    """A `DecoderRun` over [image tokens, text].

    Packed rows (`segment_ids` given) hold images [B, M, H, W, 3], all
    encoded as one batch of B M. With `kv`, the sequence is written into
    the cache from slot 0 and queries also "see" `free_slots` empty slots
    after it (masked out).
    """
    packed = segment_ids is not None
    if image.ndim != (5 if packed else 4):
      raise ValueError(
          "Images are [B, H, W, 3], or [B, M, H, W, 3] for packed rows, which "
          f"come with segment_ids; got {image.shape} and segment_ids "
          f"{'given' if packed else 'None'}.")
    images = image.reshape((-1,) + image.shape[-3:])
    slots = images.shape[0] // image.shape[0]
    tokens, mask, positions = sequence_layout(
        self.num_image_tokens, mask_ar, mask_input, segment_ids, slots)
    image_length = slots * self.num_image_tokens
    text_x = self.decoder.embed(text)
    # Each example's prompt: its text tokens that attend bidirectionally.
    prompt = jnp.where(tokens.bidirectional, tokens.segment, 0)
    image_x, image_reports = self.embed_image(
        images,
        instance=segment_means(text_x, prompt[:, image_length:],
                               slots).reshape(images.shape[0], -1),
        rows=tokens.valid[:, :image_length:self.num_image_tokens].reshape(-1))
    x = jnp.concatenate([image_x.reshape(text_x.shape[0], -1, text_x.shape[2]),
                         text_x], axis=1)
    # The decoder's instance routers see the embedded prompt: image tokens
    # and prefix text, never the suffix (Awaker2.5-VL's routing input).
    # Each token gets its own example's vector (zeros on padding).
    means = segment_means(x, prompt, slots)
    tokens = tokens.replace(instance=jnp.take_along_axis(
        jnp.pad(means, ((0, 0), (1, 0), (0, 0))), tokens.segment[..., None],
        axis=1))
    pad = lambda y: jnp.pad(y, ((0, 0),) * (y.ndim - 1) + ((0, free_slots),))
    mask = pad(mask)
    sliding_mask = sliding_window_mask(
        mask, positions, pad(positions), self.config.decoder.sliding_window,
        tokens.bidirectional, pad(tokens.bidirectional))
    h, kv, decoder_reports = self.decoder(x, tokens, mask, positions,
                                          sliding_mask=sliding_mask, kv=kv)
    # The decoder's routers are all in its scanned layers.
    return DecoderRun(hidden=h, tokens=tokens, positions=positions, kv=kv,
                      reports={**image_reports, **decoder_reports})

  def forward(self, image: jax.Array, text: jax.Array, mask_ar: jax.Array,
              mask_input: jax.Array, segment_ids: jax.Array | None = None):
    """(logits float32 [B, L, vocab] at the text positions, reports).

    One example per row, image [B, H, W, 3]; or packed rows: images
    [B, M, H, W, 3] and `segment_ids` int [B, L] (see `sequence_layout`),
    each example's logits those it would have alone in a row.

    reports: {router path: {report name: value}} (`layers.pop_reports`;
    docs/architecture.md): each sparse MoE block's `routing` (`MoEAux`,
    leaves [depth, ...] in a stack) and, while `layers.recording_usage()`,
    every router's `usage`; {} for a dense model.
    """
    run = self._run_sequence(image, text, mask_ar, mask_input, segment_ids)
    return self.decoder.logits(run.hidden[:, -text.shape[1]:]), run.reports

  def __call__(self, image: jax.Array, text: jax.Array, mask_ar: jax.Array,
               mask_input: jax.Array) -> jax.Array:
    """Logits float32 [B, L, vocab] at the text positions (see `forward`)."""
    return self.forward(image, text, mask_ar, mask_input)[0]

  def prefill(self, image: jax.Array, text: jax.Array, mask_ar: jax.Array,
              mask_input: jax.Array, *, cache_length: int):
    """Runs image + prompt (padded at the end) into a fresh KV cache of
    `cache_length` slots, the ones after [0, N + L) free for `extend`.

    Returns:
      (logits float32 [B, vocab] of each example's last valid prompt token,
       KVCache).
    """
    batch, length = text.shape[0], self.num_image_tokens + text.shape[1]
    if cache_length < length:
      raise ValueError(f"cache_length={cache_length} cannot hold the "
                       f"{length} image + prompt tokens.")
    free = cache_length - length
    config = self.config.decoder
    empty = jnp.zeros((config.depth, batch, cache_length,
                       config.num_kv_heads, config.head_dim),
                      self.decoder.embedder.embedding.dtype)
    run = self._run_sequence(image, text, mask_ar, mask_input,
                             free_slots=free, kv=(empty, empty))
    tokens, (k, v) = run.tokens, run.kv
    last = jnp.max(jnp.where(tokens.valid, jnp.arange(length), -1), axis=1)
    h_last = jnp.take_along_axis(run.hidden, last[:, None, None],
                                 axis=1)[:, 0]
    cache = KVCache(
        k=k, v=v, valid=jnp.pad(tokens.valid, ((0, 0), (0, free))),
        key_positions=jnp.pad(run.positions, ((0, 0), (0, free))),
        positions=jnp.sum(tokens.valid, axis=1, dtype=jnp.int32),
        index=jnp.asarray(length, jnp.int32),
        # One example per row: its first (image) token's vector is its own.
        instance=tokens.instance[:, 0])
    return self.decoder.logits(h_last), cache

  def extend(self, tokens: jax.Array, cache: KVCache):
    """Appends one token per example (int32 [B]) as a causal suffix token.

    Returns:
      (logits float32 [B, vocab] for the next token, updated KVCache).
    """
    batch = tokens.shape[0]
    x = self.decoder.embed(tokens[:, None])
    write = lambda slots, new: jax.lax.dynamic_update_slice(
        slots, new[:, None].astype(slots.dtype), (0, cache.index))
    valid = write(cache.valid, jnp.ones((batch,), bool))
    key_positions = write(cache.key_positions, cache.positions)
    # The new token is the latest in the sequence, so causal attention means
    # every valid slot, itself included.
    mask = valid[:, None, :]
    positions = cache.positions[:, None]
    h, (k, v), _ = self.decoder(
        x, TokenInfo.decode_step(batch, cache.instance), mask, positions,
        sliding_mask=sliding_window_mask(
            mask, positions, key_positions,
            self.config.decoder.sliding_window),
        kv=(cache.k, cache.v), index=cache.index)
    cache = cache.replace(k=k, v=v, valid=valid, key_positions=key_positions,
                          positions=cache.positions + 1,
                          index=cache.index + 1)
    return self.decoder.logits(h[:, 0]), cache
