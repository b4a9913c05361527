"""Tests for dpjax.evaluate.caption_likelihood with fake model functions."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.evaluate import caption_likelihood as cl

_L = 6


def code_loglik(params, images, tokens):
  """Fake loglik: highest when the tokens equal the image's code."""
  code = images.reshape(images.shape[0], -1)[:, :_L]
  return -params * jnp.sum(jnp.abs(tokens - code), axis=1).astype(jnp.float32)


def _prompts(k):
  # "this is a photo of a {class}": shared prefix, class token, padding 0.
  p = np.zeros((k, _L), np.int32)
  p[:, :4] = [5, 6, 7, 8]
  p[:, 4] = 100 + np.arange(k)
  return p


@pytest.mark.parametrize("batch_size", [3, 5, 64])
def test_zero_shot_picks_highest_loglik(batch_size):
  k, n = 7, 13
  rng = np.random.default_rng(0)
  labels = rng.integers(0, k, n)
  prompts = _prompts(k)
  images = prompts[labels].astype(np.float32).reshape(n, 1, 2, 3)
  images[:4] = prompts[(labels[:4] + 1) % k].reshape(4, 1, 2, 3)  # 4 wrong.
  ev = cl.ZeroShot(code_loglik, images, labels, prompts,
                   batch_size=batch_size)
  m = ev.run(jnp.float32(1.0))
  assert m == {"zero_shot/acc": 9 / 13, "zero_shot/chance": 1 / 7}


def test_zero_shot_sums_likelihood_over_prompts_of_a_class():
  # Class 0 has one prompt matching the image exactly; class 1 has three
  # prompts each slightly worse but jointly more likely: log-sum-exp decides.
  image = np.array([[1, 2, 3, 4, 5, 0]], np.float32).reshape(1, 1, 2, 3)
  c0 = [[1, 2, 3, 4, 5, 0], [9, 9, 9, 9, 9, 9], [9, 9, 9, 9, 9, 9]]
  c1 = [[1, 2, 3, 4, 6, 0], [1, 2, 3, 4, 4, 0], [1, 2, 3, 5, 5, 0]]
  prompts = np.array([c0, c1], np.int32)
  ev = cl.ZeroShot(code_loglik, image, np.array([1]), prompts)
  assert ev.run(jnp.float32(0.1))["zero_shot/acc"] == 1.0  # flat: sum wins.
  assert ev.run(jnp.float32(10.0))["zero_shot/acc"] == 0.0  # peaked: max.


def test_candidate_logliks_match_loop():
  rng = np.random.default_rng(1)
  n, k = 9, 4
  images = rng.integers(0, 5, (n, 1, 1, _L)).astype(np.float32)
  cands = rng.integers(0, 5, (n, k, _L)).astype(np.int32)
  got = cl.candidate_logliks(code_loglik, jnp.float32(1.0), images, cands,
                             batch_size=6)
  want = np.array([[code_loglik(1.0, images[i:i + 1], cands[i, j:j + 1])[0]
                    for j in range(k)] for i in range(n)])
  np.testing.assert_allclose(got, want)
  shared = cl.candidate_logliks(code_loglik, jnp.float32(1.0), images,
                                cands[0], batch_size=3, shared=True)
  want_shared = np.array(
      [[code_loglik(1.0, images[i:i + 1], cands[0, j:j + 1])[0]
        for j in range(k)] for i in range(n)])
  np.testing.assert_allclose(shared, want_shared)


def test_aro_true_caption_must_win_strictly():
  rng = np.random.default_rng(2)
  n, p = 10, 3
  true = rng.integers(1, 9, (n, _L)).astype(np.int32)
  images = true.astype(np.float32).reshape(n, 1, 1, _L)
  perturbed = np.stack([np.roll(true, s + 1, axis=1) for s in range(p)], 1)
  perturbed[0, 1] = true[0]  # A tie: counts as wrong.
  images[1] = perturbed[1, 2].reshape(1, 1, _L)  # Perturbed is better.
  perturbed[2:, :, 0] += 50  # Make the rest clearly different from true.
  m = cl.AROScore(code_loglik, images, true, perturbed, batch_size=4).run(
      jnp.float32(1.0))
  assert m == {"aro/acc": 8 / 10, "aro/chance": 1 / 4}


def test_heldout_loss_is_mean_of_per_example_loss():
  rng = np.random.default_rng(3)
  images = rng.normal(size=(11, 2, 2, 1)).astype(np.float32)
  tokens = rng.integers(0, 9, (11, _L)).astype(np.int32)
  loss_fn = lambda p, im, tok: p * jnp.mean(tok, 1) * im.reshape(-1, 4)[:, 0]
  m = cl.HeldOutCaptionLoss(loss_fn, images, tokens, batch_size=4).run(2.0)
  want = np.mean(2.0 * tokens.mean(1) * images.reshape(-1, 4)[:, 0])
  assert m["caption/heldout_loss"] == pytest.approx(want, rel=1e-5)


_VOCAB = ["<pad>", "a", "red", "cube", "blue", "ball"]


def _detok(tokens):
  words = []
  for t in tokens:
    if t == 0:
      break
    words.append(_VOCAB[t])
  return " ".join(words)


def test_captioning_scores_and_samples():
  # The fake decoder "generates" the tokens stored in the image.
  toks = np.array([[1, 2, 3, 0], [1, 4, 5, 0], [1, 2, 5, 0]], np.int32)
  images = toks.astype(np.float32).reshape(3, 1, 1, 4)
  decode_fn = lambda p, im: im.reshape(im.shape[0], -1).astype(jnp.int32)
  refs = ["A red cube", "a blue cube", "a red ball on top"]
  ev = cl.Captioning(decode_fn, images, refs, _detok, batch_size=2)
  assert ev.samples(None, 2) == ["a red cube", "a blue ball"]
  m = ev.run(None)
  assert m["captioning/exact_match"] == pytest.approx(1 / 3)
  assert m["captioning/word_acc"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
  assert m["captioning/word_f1"] == pytest.approx((1 + 2 / 3 + 6 / 8) / 3)
  ev_nojit = cl.Captioning(decode_fn, images, refs, _detok, jit=False)
  assert ev_nojit.run(None) == m


def test_aro_kinds_are_scored_pairwise_like_aro():
  code = np.random.default_rng(2).integers(1, 9, (10, _L)).astype(np.int32)
  images = code.astype(np.float32).reshape(10, 1, 1, _L)
  true = code.copy()
  true[1:3] += 1  # Rows 1-2: true is off by one token value...
  perturbed = np.stack([code + 5] * 3, axis=1)  # (kinds are off by five)
  perturbed[1:3, 2] = code[1:3]  # ...and kind "c" matches the image there.
  perturbed[0, 1] = true[0]  # A tie with kind "b" counts as wrong.
  m = cl.AROScore(code_loglik, images, true, perturbed, batch_size=4,
                  kinds=("a", "b", "c")).run(jnp.float32(1.0))
  assert m["aro/a_acc"] == 1.0
  assert m["aro/b_acc"] == 9 / 10 and m["aro/c_acc"] == 8 / 10
  assert m["aro/acc"] == 7 / 10  # Rows 0-2 fail "beats all three".
  assert m["aro/pairwise_acc"] == pytest.approx(27 / 30)
  with pytest.raises(ValueError, match="2 kinds for 3"):
    cl.AROScore(code_loglik, images, true, perturbed, kinds=("a", "b"))


def test_token_accuracy_per_category():
  # Fake model: predicts the true next token except where the target is in
  # `wrong` (then it predicts token 1). Vocabulary of 8.
  tokens = np.array([[2, 3, 4, 5, 0], [2, 4, 6, 7, 0], [2, 3, 3, 0, 0]],
                    np.int32)
  wrong = {4, 7}

  def logits_fn(params, images, toks):
    del params, images
    tgt = toks[:, 1:]
    pred = jnp.where(jnp.isin(tgt, jnp.array(list(wrong))), 1, tgt)
    return jnp.eye(8)[pred]

  images = np.zeros((3, 2, 2, 3), np.float32)
  ev = cl.TokenAccuracy(logits_fn, images, tokens,
                        {"a": [3, 4], "b": [6, 7], "absent": [1]},
                        batch_size=2, prefix="cap")
  out = ev.run(None)
  # Category a: targets 3, 4, 4, 3, 3 -> 3 right of 5. Category b: 6, 7.
  assert out == {"cap/a_token_acc": pytest.approx(3 / 5),
                 "cap/b_token_acc": pytest.approx(1 / 2)}
