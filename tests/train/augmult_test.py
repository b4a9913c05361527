"""train.augmult: K augmented copies per example, gradient averaged over the
copies, clipped once (vmap and ghost), wired into the phases it applies to."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dp_linear
from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.data import transforms as transforms_lib
from dpjax.models import vit
from dpjax.train import augmult
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import phase_plan
from dpjax.train import task as task_lib

K, B, C = 3, 4, 0.05


def test_copies_are_independent_augmentations_fixed_by_the_rng():
  record = {"image": np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)}
  t = transforms_lib.Augmult(transforms_lib.image_pipeline(6, augment=True), K)
  out = t.random_map(dict(record), np.random.default_rng(7))
  assert out["image"].shape == (K, 6, 6, 3)
  assert len({c.tobytes() for c in out["image"]}) == K  # Distinct crops.
  again = t.random_map(dict(record), np.random.default_rng(7))
  np.testing.assert_array_equal(out["image"], again["image"])


def _vit_loss():
  cfg = vit.vit_config("mu/4", depth=1, width=32, mlp_dim=64, num_heads=2,
                       pos_embedding="learn", use_cls_token=True)
  model = vit.ViT(**cfg)
  key = jax.random.PRNGKey(3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)))
  head = jax.random.normal(key, (cfg["width"], 3))

  def loss_fn(p, ex):  # One copy: image [12, 12, 3], rng uint32[2].
    noise = 0.1 * jax.random.normal(ex["rng"], ex["image"].shape)
    tokens = model.apply({"params": p}, (ex["image"] + noise)[None])
    return -jax.nn.log_softmax(jnp.mean(tokens, axis=1) @ head)[0, ex["label"]]

  batch = {"image": jax.random.normal(key, (B, K, 12, 12, 3)),
           "label": jnp.tile((jnp.arange(B) % 3)[:, None], (1, K)),
           "rng": jax.random.split(key, B)}
  return loss_fn, params["params"], batch


@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_mean_of_copies_then_one_clip_equals_brute_force(method):
  loss_fn, params, batch = _vit_loss()
  mask = jnp.array([1.0, 1.0, 0.0, 1.0])
  got, aux = jax.jit(privacy.clipped_grad(
      augmult.mean_over_copies(loss_fn, K), C, method=method))(
          params, batch, mask)
  want = jax.tree.map(jnp.zeros_like, params)
  for i in range(B):
    if not mask[i]:
      continue
    keys = jax.random.split(batch["rng"][i], K)
    grads = [jax.grad(loss_fn)(params, {"image": batch["image"][i, j],
                                        "label": batch["label"][i, j],
                                        "rng": keys[j]}) for j in range(K)]
    g = jax.tree.map(lambda *x: sum(x) / K, *grads)
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    want = jax.tree.map(lambda w, x: w + x * jnp.minimum(1.0, C / norm),
                        want, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert float(aux["count"]) == 3.0
  if method == "auto":  # The K copies are one example's rows: no fallback.
    from dpjax.privacy import ghost  # pylint: disable=g-import-not-at-top
    plan = ghost.clipping_plan(augmult.mean_over_copies(loss_fn, K), params,
                               batch)
    kernels = [p for p in plan if p.endswith("kernel")]
    assert kernels and all(plan[p].startswith("ghost:") for p in kernels)


def _phase(**kw):
  return task_lib.Phase(name="dp", private=True, source=list(range(10)),
                        transforms=[], loss_fn=lambda p, x: 0.0, steps=1,
                        batch_size=2, optimizer=None, **kw)


def test_applies_to_private_example_phases_only():
  phase = _phase()
  out = augmult.apply(phase, 4)
  assert isinstance(out.transforms[0], transforms_lib.Augmult)
  assert out.transforms[0].k == 4 and out.loss_fn is not phase.loss_fn
  assert augmult.apply(phase, 1) is phase
  public = dataclasses.replace(phase, private=False)
  assert augmult.apply(public, 4) is public
  users = _phase(make_batches=lambda **kw: None)
  with pytest.raises(errors.ConfigError, match="config.train.augmult=4"):
    augmult.apply(users, 4)


def test_refused_with_the_canary_audit():
  config = dp_linear.get_config()
  config.train.augmult = 2
  with pytest.raises(errors.ConfigError, match="audit"):
    phase_plan.resolve_phases(config, [_phase()], canaries=object())


def test_identical_copies_train_exactly_as_one(tmp_path):
  """dp_linear has no random augmentation: K identical copies average to
  the single example's gradient, so a seeded run ends where K=1 does."""
  params = []
  for k in (1, 2):
    config = dp_linear.get_config()
    config.train.update(dict(steps=5, augmult=k))
    config.privacy.update(dict(noise_seed=1, sampling_seed=2))
    config.evals.accuracy.log_steps = -1
    workdir = str(tmp_path / str(k))
    recipes.run(config, workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    params.append(ckpt.restore_numpy()[0]["params"])
    ckpt.close()
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
