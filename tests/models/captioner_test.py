"""Tests for dpjax.models.captioner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import captioner
from tests.models import checks

CFG = dict(
    encoder=dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4,
                 use_bias=False, use_cls_token=True, learn_cls_token=False),
    decoder=dict(vocab_size=40, width=24, depth=2, num_heads=2, mlp_dim=48,
                 max_len=12))


def _batch(b=3):
  images = jax.random.normal(jax.random.PRNGKey(0), (b, 16, 16, 3))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b, 10), 3, 40)
  tokens = tokens.at[:, 0].set(1).at[1, 6:].set(0).at[2, 3:].set(0)
  return images, tokens.astype(jnp.int32)


@pytest.fixture(scope="module")
def setup():
  model = captioner.Captioner(**CFG)
  images, tokens = _batch()
  params = jax.jit(model.init)(jax.random.PRNGKey(2), images, tokens)
  return model, params, images, tokens


def test_shapes(setup):
  model, params, images, tokens = setup
  assert model.apply(params, images, tokens).shape == (3, 9, 40)
  enc = model.apply(params, images, method=captioner.Captioner.encode)
  assert enc.shape == (3, 17, 32)
  f1 = model.apply(params, images, method=captioner.Captioner.features)
  f2 = model.apply(params, images, "mean",
                   method=captioner.Captioner.features)
  assert f1.shape == (3, 24) and f2.shape == (3, 32)
  assert set(params["params"]) == {"encoder", "decoder"}


def test_caption_loss_ignores_pads_and_normalises_per_example():
  logits = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 7))
  targets = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 1, 2]], jnp.int32)
  loss = captioner.caption_loss(logits, targets)
  logp = jax.nn.log_softmax(logits)
  ce = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None],
                           -1)[..., 0]
  np.testing.assert_allclose(loss, [ce[0, :3].mean(), ce[1].mean()],
                             rtol=1e-5)
  # Logits at pad targets do not matter.
  noisy = logits.at[0, 3:].add(100.0)
  np.testing.assert_allclose(captioner.caption_loss(noisy, targets), loss,
                             rtol=1e-6)
  ll = captioner.sequence_log_likelihood(logits, targets)
  np.testing.assert_allclose(ll, [-ce[0, :3].sum(), -ce[1].sum()], rtol=1e-5)
  assert captioner.caption_loss(logits, jnp.zeros_like(targets))[0] == 0.0


def test_per_example_grads_equal_loop(setup):
  model, params, images, tokens = setup

  def loss(p, x, t):
    logits = model.apply(p, x[None], t[None])
    return captioner.caption_loss(logits, t[None, 1:])[0]

  checks.assert_vmap_grads_match_loop(loss, params, images, tokens)


def test_greedy_decode(setup):
  model, params, images, _ = setup
  out = captioner.greedy_decode(model, params, images, max_len=12, bos_id=1,
                                eos_id=2)
  assert out.shape == (3, 12) and out.dtype == jnp.int32
  assert bool(jnp.all(out[:, 0] == 1))
  # Greedy: each generated token is the argmax given its prefix.
  enc = model.apply(params, images, method=captioner.Captioner.encode)
  logits = model.apply(params, out, enc, method=captioner.Captioner.decode)
  expected = jnp.argmax(logits[:, :-1], -1)
  after_eos = jnp.cumsum(out[:, :-1] == 2, axis=1) > 0
  np.testing.assert_array_equal(jnp.where(after_eos, 0, expected),
                                out[:, 1:])


def test_bf16_runs():
  model = captioner.Captioner(**CFG, dtype=jnp.bfloat16)
  images, tokens = _batch()
  params = model.init(jax.random.PRNGKey(2), images, tokens)
  logits = model.apply(params, images, tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_configs_and_paper_param_count():
  tiny = captioner.captioner_config("tiny", vocab_size=300)
  assert tiny["decoder"]["vocab_size"] == 300
  cfg = captioner.captioner_config("paper")
  assert cfg["decoder"]["vocab_size"] == 30522
  assert cfg["decoder"]["max_len"] == 40 and cfg["decoder"]["depth"] == 6
  model = captioner.Captioner(**cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 40), jnp.int32))
  count = lambda t: sum(int(np.prod(s.shape))
                        for s in jax.tree_util.tree_leaves(t))
  enc = count(shapes["params"]["encoder"])
  dec = count(shapes["params"]["decoder"])
  assert 85e6 < enc < 86e6, enc  # ViT-B/16 without block biases
  # 6 blocks x 9.4M + token embed, head (30522 x 768 each), decoder_embed.
  assert 103e6 < dec < 106e6, dec
