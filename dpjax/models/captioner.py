"""Image captioner (DP-Cap, Sander et al. 2024): ViT encoder + text decoder.

Training is teacher-forced next-token prediction: `model.apply(params,
images, tokens)` feeds tokens[:, :-1] and returns logits for the targets
tokens[:, 1:]; `caption_loss(logits, tokens[:, 1:])` gives the per-example
loss DP-Cap clips (mean over that example's non-pad targets).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import text_decoder
from dpjax.models import vit

# Decoder settings per encoder size (DP-Cap: 6 layers, width capped at 768).
_PAPER_VOCAB = 30522  # bert-base-uncased
_PAPER_LEN = 40


def captioner_config(variant: str, **decoder_overrides: Any) -> dict:
  """Returns `Captioner` keyword arguments {"encoder": ..., "decoder": ...}.

  Args:
    variant: "tiny" (CPU: 32x32 images, patch 8, 64-d x 3 encoder, 2-layer
      64-d decoder, vocab 512, 32 tokens), "paper" / "B/16" (DP-Cap: ViT-B/16
      224x224 without biases, 6-layer 768-d decoder, 12 heads, vocab 30,522,
      40 tokens), or "Ti/16", "S/16", "L/16".
    **decoder_overrides: TextDecoder fields to override (e.g. vocab_size to
      match the tokenizer, max_len).

  Returns:
    dict with "encoder" (ViT kwargs) and "decoder" (TextDecoder kwargs,
    including vocab_size and max_len).
  """
  enc_kw = dict(use_bias=False, use_cls_token=True, learn_cls_token=False,
                pos_embedding="sincos2d")
  if variant == "tiny":
    # 16 patches of 8x8: ~1,000 DP examples/s on a 2-core CPU.
    encoder = vit.vit_config("mu/8", width=64, depth=3, mlp_dim=256, **enc_kw)
    decoder = dict(vocab_size=512, width=64, depth=2, num_heads=4,
                   mlp_dim=256, max_len=32)
  else:
    variant = "B/16" if variant == "paper" else variant
    encoder = vit.vit_config(variant, **enc_kw)
    width = min(encoder["width"], 768)
    decoder = dict(vocab_size=_PAPER_VOCAB, width=width, depth=6,
                   num_heads=width // 64, mlp_dim=4 * width,
                   max_len=_PAPER_LEN)
  decoder.update(use_bias=False)
  decoder.update(decoder_overrides)
  return dict(encoder=encoder, decoder=decoder)


class Captioner(nn.Module):
  """ViT encoder + autoregressive TextDecoder.

  Attributes:
    encoder: `vit.ViT` keyword arguments (see `vit.vit_config`).
    decoder: `text_decoder.TextDecoder` keyword arguments.
    dtype: computation dtype for both parts (params float32).
  """
  encoder: dict
  decoder: dict
  dtype: Any = jnp.float32

  def setup(self):
    self.image_encoder = vit.ViT(**self.encoder, dtype=self.dtype,
                                 name="encoder")
    self.text_decoder = text_decoder.TextDecoder(
        **self.decoder, dtype=self.dtype, name="decoder")

  def encode(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] images -> encoder tokens [B, N(+1), De]."""
    return self.image_encoder(images)

  def decode(self, tokens: jax.Array, encoder_tokens: jax.Array) -> jax.Array:
    """int32 [B, L] input tokens -> float32 logits [B, L, V] (no shift)."""
    return self.text_decoder(tokens, encoder_tokens)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """Teacher-forced logits.

    Args:
      images: [B, H, W, C].
      tokens: int32 [B, L] full captions (BOS first, pad id 0 at the end).

    Returns:
      float32 logits [B, L-1, V] for the targets tokens[:, 1:].
    """
    return self.decode(tokens[:, :-1], self.encode(images))

  def features(self, images: jax.Array,
               pooling: str = "decoder_embed") -> jax.Array:
    """Linear-probe representation.

    Args:
      images: [B, H, W, C].
      pooling: "decoder_embed" (DP-Cap `linear_prob_forward`: encoder tokens
        projected by decoder_embed, averaged over all tokens; [B, Dd]) or
        "mean" (encoder tokens averaged, CLS excluded; [B, De]).

    Returns:
      float32 [B, D].
    """
    tokens = self.encode(images)
    if pooling == "decoder_embed":
      projected = self.text_decoder.project_encoder(tokens)
      return jnp.mean(projected, axis=1).astype(jnp.float32)
    return vit.pool_tokens(tokens, self.encoder.get("use_cls_token", False),
                           pooling)


def _target_log_probs(logits: jax.Array, targets: jax.Array,
                      pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Returns (log p(target) [B, L], non-pad mask [B, L] float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = (targets != pad_id).astype(jnp.float32)
  return tok * mask, mask


def caption_loss(logits: jax.Array, targets: jax.Array,
                 pad_id: int = 0) -> jax.Array:
  """Per-example mean token cross-entropy over non-pad targets (DP-Cap).

  Args:
    logits: [B, L, V].
    targets: int32 [B, L] (usually tokens[:, 1:]); pad_id entries ignored.
    pad_id: padding token id.

  Returns:
    float32 [B]: each example's summed CE divided by its own number of
    non-pad targets (0 for an all-pad example).
  """
  tok, mask = _target_log_probs(logits, targets, pad_id)
  return -jnp.sum(tok, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def sequence_log_likelihood(logits: jax.Array, targets: jax.Array,
                            pad_id: int = 0) -> jax.Array:
  """Summed log-probability of the non-pad targets, [B] float32.

  Used for zero-shot classification / ARO scoring of candidate captions.
  """
  tok, _ = _target_log_probs(logits, targets, pad_id)
  return jnp.sum(tok, axis=-1)


def greedy_decode(model: Captioner, params: Any, images: jax.Array,
                  max_len: int, bos_id: int, eos_id: int,
                  pad_id: int = 0) -> jax.Array:
  """Greedy captioning (recomputes the whole decoder each step).

  Args:
    model: a `Captioner`.
    params: its variables ({"params": ...}).
    images: [B, H, W, C].
    max_len: output length, <= decoder max_len.
    bos_id: start token, written at position 0.
    eos_id: end token; positions after an emitted EOS are `pad_id`.
    pad_id: padding id.

  Returns:
    int32 [B, max_len]: BOS, generated tokens, EOS, then pads.
  """

  @jax.jit
  def run(params, images):
    enc = model.apply(params, images, method=Captioner.encode)
    b = images.shape[0]
    tokens = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)

    def step(i, carry):
      tokens, done = carry
      logits = model.apply(params, tokens, enc, method=Captioner.decode)
      nxt = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
      nxt = jnp.where(done, pad_id, nxt)
      tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i + 1))
      return tokens, done | (nxt == eos_id)

    tokens, _ = jax.lax.fori_loop(0, max_len - 1, step,
                                  (tokens, jnp.zeros((b,), bool)))
    return tokens

  return run(params, images)
