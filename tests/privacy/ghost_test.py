"""Fast clipping (ghost norms + book-keeping) against the vmap reference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import privacy
from dpjax.models import captioner
from dpjax.models import vit
from dpjax.privacy import clipping
from dpjax.privacy import ghost

B = 4


def _ref_norms(loss_fn, params, batch):
  grads = clipping.per_example_grads(loss_fn)(params, batch)
  return np.asarray(jax.vmap(clipping.global_norm)(grads))


def _fast_norms(fn, params, batch):
  """Per-example norms through the public API: one-hot mask -> norm sum."""
  out = []
  for i in range(B):
    _, aux = fn(params, batch, jnp.zeros((B,)).at[i].set(1.0))
    out.append(float(aux["grad_norm_sum"]))
  return np.asarray(out)


def _assert_tree_close(got, want, rtol):
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                               rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


def _check(loss_fn, params, batch, methods=("ghost", "auto"), clip=None):
  """Norms (rel 1e-5) and clipped sums equal the vmap reference."""
  ref = _ref_norms(loss_fn, params, batch)
  c = float(np.median(ref)) if clip is None else clip  # Half get clipped.
  mask = jnp.ones((B,))
  want, want_aux = clipping.clipped_grad(loss_fn, c)(params, batch, mask)
  for method in methods:
    fn = jax.jit(privacy.clipped_grad(loss_fn, c, method=method))
    np.testing.assert_allclose(_fast_norms(fn, params, batch), ref,
                               rtol=1e-5)
    got, aux = fn(params, batch, mask)
    _assert_tree_close(got, want, 1e-5)
    for k in want_aux:
      np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-5)


def _setup(module, *inputs):
  params = module.init(jax.random.PRNGKey(0), *[x[:1] for x in inputs])
  params = params["params"]

  def loss_fn(p, ex):
    out = module.apply({"params": p}, *[x[None] for x in ex])
    return jnp.sum(jnp.sin(out.astype(jnp.float32)) ** 2)

  return loss_fn, params, tuple(inputs)


_KEY = jax.random.PRNGKey(1)
_SEQ = jax.random.normal(_KEY, (B, 6, 16))
_IMG = jax.random.normal(_KEY, (B, 8, 8, 3))
_IDS = jax.random.randint(_KEY, (B, 7), 0, 9)

# name -> (module, inputs, {param path: expected plan} for method="auto").
LAYERS = {
    "dense_seq_gram": (nn.Dense(40), (_SEQ,),
                       {"bias": "ghost:gram", "kernel": "ghost:gram"}),
    "dense_seq_outer": (nn.Dense(3, use_bias=False), (_SEQ,),
                        {"kernel": "ghost:outer"}),
    "dense_vector": (nn.Dense(3), (_SEQ[:, 0],),
                     {"bias": "ghost:gram", "kernel": "ghost:gram"}),
    "dense_general_out": (nn.DenseGeneral((2, 4), axis=-1), (_SEQ,), None),
    "dense_general_in": (nn.DenseGeneral(3, axis=(-2, -1)), (_SEQ,), None),
    # Unsorted axes: flax sorts them, so the kernel is [6, 16, ...] either way.
    "dense_general_unsorted": (nn.DenseGeneral(3, axis=(2, 1)), (_SEQ,),
                               {"bias": "ghost:gram", "kernel": "ghost:gram"}),
    "dense_general_unsorted_neg": (
        nn.DenseGeneral((2, 4), axis=(-1, -2)), (_SEQ,),
        {"bias": "ghost:gram", "kernel": "ghost:gram"}),
    "dense_general_unsorted_free": (  # Contracts dims 3 and 1; 0, 2 free.
        nn.DenseGeneral(5, axis=(-1, 1)), (_IMG,),
        {"bias": "ghost:outer", "kernel": "ghost:outer"}),
    "patch_conv": (nn.Conv(7, (4, 4), strides=(4, 4), padding="VALID"),
                   (_IMG,), {"bias": "ghost:gram", "kernel": "ghost:gram"}),
    "embed_gram": (nn.Embed(100, 6), (_IDS,), {"embedding": "ghost:gram"}),
    "embed_outer": (nn.Embed(9, 6), (_IDS,), {"embedding": "ghost:outer"}),
    "layer_norm": (nn.LayerNorm(), (_SEQ,), {"bias": "copy", "scale": "copy"}),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_norms_and_sums_match_vmap(name):
  module, inputs, plan = LAYERS[name]
  loss_fn, params, batch = _setup(module, *inputs)
  if plan is not None:
    assert ghost.clipping_plan(loss_fn, params, batch) == plan
  _check(loss_fn, params, batch)


class _Shared(nn.Module):
  """Params read more than once. A layer called twice (and nothing else
  reading its params) takes the fast path, its calls' rows concatenated;
  the others need the exact fallback."""

  @nn.compact
  def __call__(self, x, ids):
    twice = nn.Dense(16, name="twice")  # Called twice: per-example grad sums.
    h = twice(jnp.tanh(twice(x)))
    emb = nn.Embed(9, 16, name="tied")  # __call__ and attend share the table.
    h = h + emb(ids)[..., :1, :]
    logits = emb.attend(h)
    read = nn.Dense(9, name="read")  # Kernel also read outside the layer.
    out = read(logits) + 0.1 * jnp.sum(read.variables["params"]["kernel"])
    out = out + nn.remat(nn.Dense)(9, name="remat")(logits)
    scale = self.param("raw", nn.initializers.ones, (9,))
    self.param("unused", nn.initializers.ones, (2,))
    return nn.Dense(3, name="fast")(out * scale)


def test_shared_params_take_the_exact_fallback_or_concatenated_rows():
  loss_fn, params, batch = _setup(_Shared(), _SEQ, _IDS)
  plan = ghost.clipping_plan(loss_fn, params, batch)
  for name in ("tied", "read", "remat"):
    assert all(plan[p] == "copy" for p in plan if p.startswith(name)), plan
  assert plan["raw"] == "copy" and plan["unused"] == "zero"
  for name in ("fast", "twice"):
    assert plan[f"{name}/kernel"].startswith("ghost:"), plan
    assert plan[f"{name}/bias"].startswith("ghost:"), plan
  _check(loss_fn, params, batch)


def _vit_loss():
  cfg = vit.vit_config("mu/4", depth=1, width=32, mlp_dim=64, num_heads=2,
                       pos_embedding="learn", use_cls_token=True)
  model = vit.ViT(**cfg)
  images = jax.random.normal(_KEY, (B, 12, 12, 3))
  params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
  head = jax.random.normal(_KEY, (cfg["width"], 3))

  def loss_fn(p, ex):
    tokens = model.apply({"params": p}, ex["image"][None])
    logits = jnp.mean(tokens, axis=1) @ head
    return -jax.nn.log_softmax(logits)[0, ex["label"]]

  return loss_fn, params, {"image": images, "label": jnp.arange(B) % 3}


def _captioner_loss(stem="patch"):
  cfg = captioner.captioner_config("tiny", vocab_size=64, max_len=8)
  small = dict(depth=1, width=32, mlp_dim=64, num_heads=2)
  cfg["encoder"].update(small, stem=stem)
  cfg["decoder"].update(small)
  model = captioner.Captioner(**cfg)
  # hMLP: 16 px images, three 2x2 stages down to a 2x2 token grid.
  side = 16 if stem == "hmlp" else 12
  images = jax.random.normal(_KEY, (B, side, side, 3))
  tokens = jax.random.randint(_KEY, (B, 8), 0, 64)
  params = model.init(jax.random.PRNGKey(0), images[:1],
                      tokens[:1])["params"]

  def loss_fn(p, ex):
    logits = model.apply({"params": p}, ex["image"][None], ex["tokens"][None])
    return captioner.caption_loss(logits, ex["tokens"][None, 1:])[0]

  return loss_fn, params, {"image": images, "tokens": tokens}


@pytest.mark.parametrize("make", [
    _vit_loss, _captioner_loss,
    functools.partial(_captioner_loss, stem="hmlp")])
def test_full_models_match_vmap(make):
  loss_fn, params, batch = make()
  plan = ghost.clipping_plan(loss_fn, params, batch)
  dense = [p for p in plan if p.endswith("kernel")]
  assert dense and all(plan[p].startswith("ghost:") for p in dense), plan
  _check(loss_fn, params, batch, methods=("auto",))


def test_padding_rows_add_exactly_zero_even_if_nan():
  loss_fn, params, batch = _setup(nn.Dense(4), _SEQ)
  bad = (batch[0].at[1].set(jnp.nan),)
  mask = jnp.array([1.0, 0.0, 1.0, 1.0])
  got, aux = jax.jit(privacy.clipped_grad(loss_fn, 0.5, method="ghost"))(
      params, bad, mask)
  want, want_aux = clipping.clipped_grad(loss_fn, 0.5)(params, batch, mask)
  _assert_tree_close(got, want, 1e-5)
  assert float(aux["count"]) == 3.0
  assert np.isfinite(float(aux["grad_norm_sum"]))
  np.testing.assert_allclose(aux["grad_norm_sum"], want_aux["grad_norm_sum"],
                             rtol=1e-5)


class _TwoHeads(nn.Module):
  """Dense + LayerNorm (exact fallback) + Dense, and a linear Dense head."""

  @nn.compact
  def __call__(self, x, s):
    h = nn.LayerNorm()(nn.Dense(8)(x))
    out = jnp.sum(jnp.sin(nn.Dense(3)(h)) ** 2)
    # |x| > 0: an inf output gradient gives +inf kernel gradients, no NaN.
    return out + s * jnp.sum(nn.Dense(2, name="lin")(jnp.abs(x)))


def _nonfinite_setup():
  """Row 1: a NaN input (NaN gradients and norm). Row 2: an inf weight of
  the linear head's output (that head's output gradients are inf, so its
  gradient is +-inf, with no NaN: inf norm; the loss is inf)."""
  module = _TwoHeads()
  params = module.init(jax.random.PRNGKey(0), _SEQ[:1], 0.1)["params"]

  def loss_fn(p, ex):
    return module.apply({"params": p}, ex["x"][None], ex["s"])

  batch = {"x": _SEQ, "s": jnp.full((B,), 0.1)}
  bad = {"x": _SEQ.at[1, 2, 3].set(jnp.nan),
         "s": batch["s"].at[2].set(jnp.inf)}
  return loss_fn, params, batch, bad


@pytest.mark.parametrize("micro", [None, 2])
@pytest.mark.parametrize("clip_mode", ["clip", "normalize"])
@pytest.mark.parametrize("method", ["vmap", "ghost", "auto"])
def test_nonfinite_real_rows_contribute_exactly_zero(method, clip_mode, micro):
  loss_fn, params, batch, bad = _nonfinite_setup()
  plan = ghost.clipping_plan(loss_fn, params, bad)
  assert all(plan[f"{n}/kernel"].startswith("ghost:")
             for n in ("Dense_0", "Dense_1", "lin"))
  assert plan["LayerNorm_0/scale"] == "copy"
  grads = clipping.per_example_grads(loss_fn)(params, bad)
  norms = np.asarray(jax.vmap(clipping.global_norm)(grads))
  # Factor 1 (NaN norm) or 0 * inf (inf norm) made the old sum NaN.
  assert np.isnan(norms[1]) and np.isposinf(norms[2])
  assert all(np.isposinf(x[2]).all() for x in jax.tree.leaves(grads["lin"]))
  mask = jnp.ones((B,))
  without = jnp.array([1.0, 0.0, 0.0, 1.0])
  kw = dict(clipping=clip_mode, microbatch_size=micro)
  fn = jax.jit(privacy.clipped_grad(loss_fn, 0.5, method=method, **kw))
  got, aux = fn(params, bad, mask)
  want, want_aux = clipping.clipped_grad(loss_fn, 0.5, **kw)(
      params, batch, without)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
  _assert_tree_close(got, want, 1e-5)
  assert float(aux["num_nonfinite"]) == 2.0
  assert float(aux["count"]) == 4.0
  for k in ("loss_sum", "grad_norm_sum", "num_clipped"):
    assert np.isfinite(float(aux[k]))
    np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-5)
  # The same with those rows masked out as padding.
  masked, masked_aux = fn(params, bad, without)
  _assert_tree_close(got, masked, 1e-6)
  assert float(masked_aux["num_nonfinite"]) == 0.0


def test_normalize_and_microbatches_match_vmap():
  loss_fn, params, batch = _vit_loss()
  mask = jnp.array([1.0, 1.0, 0.0, 1.0])
  for kw in (dict(clipping="normalize"), dict(microbatch_size=2)):
    want, _ = clipping.clipped_grad(loss_fn, 0.1, **kw)(params, batch, mask)
    got, _ = jax.jit(privacy.clipped_grad(loss_fn, 0.1, method="auto", **kw))(
        params, batch, mask)
    _assert_tree_close(got, want, 1e-5)


def test_bfloat16_compute_is_close_to_float32():
  loss_fn, params, batch = _vit_loss()
  ref = _ref_norms(loss_fn, params, batch)
  fn = jax.jit(privacy.clipped_grad(loss_fn, 0.1, method="auto",
                                    compute_dtype=jnp.bfloat16))
  np.testing.assert_allclose(_fast_norms(fn, params, batch), ref, rtol=2e-2)
  mask = jnp.ones((B,))
  want, _ = clipping.clipped_grad(loss_fn, 0.1)(params, batch, mask)
  got, _ = fn(params, batch, mask)
  _assert_tree_close(got, want, 3e-2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))


def test_bad_arguments_raise():
  loss_fn = lambda w, x: jnp.sum(w * x)
  with pytest.raises(ValueError, match="method"):
    privacy.clipped_grad(loss_fn, 1.0, method="fast")
  with pytest.raises(ValueError, match="compute_dtype"):
    privacy.clipped_grad(loss_fn, 1.0, method="vmap",
                         compute_dtype=jnp.bfloat16)
