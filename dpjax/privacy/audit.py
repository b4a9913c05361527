"""Privacy auditing: canaries and empirical epsilon lower bounds.

An audit inserts *canaries* into a DP computation, each included
independently with probability 1/2, scores every canary after the fact, and
turns "included canaries score higher than excluded ones" into a lower bound
on epsilon that holds with probability >= ``confidence`` over the run's
randomness. A bound above the accountant's epsilon means the implementation
(or the analysis) is broken; a bound far below it means the audit is weak, not
that the run is more private than claimed.

Statistics (exact finite-sample bounds; ``audit_stats.py``, re-exported
here): ``one_run_audit`` (Steinke, Nasr and Jagielski 2023, one training run)
and ``many_run_audit`` (threshold test with Clopper-Pearson intervals).

Canaries: gradient-space Dirac canaries (``dirac_canaries``) for white-box
audits of the DP step (``audit_gaussian_step``), and input-space helpers
(``choose_included``, ``mislabel``, ``insert_canaries``,
``audit_input_canaries``) for auditing a training run from the final model.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from dpjax.privacy import accounting
from dpjax.privacy import audit_stats
from dpjax.privacy import bandmf
from dpjax.privacy import blt
from dpjax.privacy import clipping
from dpjax.privacy import noise


PyTree = Any
IntOrSeq = Union[int, Sequence[int]]

# The statistics, re-exported so `audit.<name>` keeps working.
AuditResult = audit_stats.AuditResult
clopper_pearson = audit_stats.clopper_pearson
epsilon_lower_bound_threshold = audit_stats.epsilon_lower_bound_threshold
many_run_audit = audit_stats.many_run_audit
one_run_p_value = audit_stats.one_run_p_value
one_run_epsilon_lower_bound = audit_stats.one_run_epsilon_lower_bound
one_run_audit = audit_stats.one_run_audit

# ------------------------------------------------------------------ canaries


def choose_included(num_canaries: int, seed: int) -> np.ndarray:
  """bool[num_canaries]: each canary included independently w.p. 1/2.

  >>> choose_included(8, seed=0).astype(int).tolist()
  [0, 1, 1, 1, 0, 0, 0, 0]
  """
  return np.random.default_rng(seed).random(num_canaries) < 0.5


def dirac_canaries(params_like: PyTree, num: int, seed: int, *,
                   l2_norm: float = 1.0, kind: str = "dirac") -> PyTree:
  """Gradient-space canaries: ``num`` directions in parameter space.

  "dirac": canary i is ``l2_norm`` times a one-hot vector on a distinct
  coordinate of the flattened parameters (coordinates drawn without
  replacement from ``seed``), so canaries never interfere. "random": i.i.d.
  uniformly random directions of norm ``l2_norm`` (nearly orthogonal when
  the parameter count >> num).

  >>> c = dirac_canaries({"w": jnp.zeros((2, 2))}, 3, seed=0)
  >>> c["w"].shape, c["w"].reshape(3, 4).sum(1).tolist()
  ((3, 2, 2), [1.0, 1.0, 1.0])

  Args:
    params_like: pytree of arrays shaped like the parameters.
    num: number of canaries (<= parameter count for "dirac").
    seed: seed of the coordinate / direction draw.
    l2_norm: L2 norm of every canary (use >= C so clipping bounds them at C).
    kind: "dirac" or "random".

  Returns:
    Pytree like ``params_like`` with leaves of shape ``[num, *leaf.shape]``
    (dense; memory num * parameter count), float32.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(params_like)
  dim = flat.size
  rng = np.random.default_rng(seed)
  if kind == "dirac":
    if num > dim:
      raise ValueError(f"{num} Dirac canaries need >= {num} parameters, got "
                       f"{dim}.")
    vecs = np.zeros((num, dim), np.float32)
    vecs[np.arange(num), rng.choice(dim, num, replace=False)] = l2_norm
  elif kind == "random":
    vecs = rng.normal(size=(num, dim))
    vecs *= l2_norm / np.linalg.norm(vecs, axis=1, keepdims=True)
  else:
    raise ValueError(f"kind must be 'dirac' or 'random', got {kind!r}.")
  return jax.vmap(unravel)(jnp.asarray(vecs, jnp.float32))


def canary_scores(update: PyTree, canaries: PyTree) -> jax.Array:
  """White-box scores: <update, canary_i> / ||canary_i||, float32 [num].

  >>> canary_scores({"w": jnp.array([1., 2.])},
  ...               {"w": jnp.array([[3., 0.], [0., 2.]])}).tolist()
  [1.0, 2.0]
  """
  dots = sum(jnp.sum((c * u[None]).reshape(c.shape[0], -1), axis=1)
             for u, c in zip(jax.tree_util.tree_leaves(update),
                             jax.tree_util.tree_leaves(canaries)))
  return dots / jax.vmap(clipping.global_norm)(canaries)


def mislabel(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """Input-space canary labels: each label moved to a uniformly random OTHER
  class (so the canary can only be fit by memorising it).

  >>> mislabel(np.array([0, 1, 2, 0]), 3, seed=0).tolist()
  [2, 0, 1, 1]
  """
  labels = np.asarray(labels)
  shift = np.random.default_rng(seed).integers(1, num_classes, labels.shape)
  return ((labels + shift) % num_classes).astype(labels.dtype)


def insert_canaries(dataset: dict, canaries: dict,
                    included: np.ndarray) -> dict:
  """Appends the included canaries to an array dataset (dict of [N, ...]).

  >>> d = insert_canaries({"x": np.zeros(3)}, {"x": np.array([7., 8.])},
  ...                     np.array([False, True]))
  >>> d["x"].tolist()
  [0.0, 0.0, 0.0, 8.0]
  """
  included = np.asarray(included, bool)
  return {k: np.concatenate([np.asarray(v), np.asarray(canaries[k])[included]])
          for k, v in dataset.items()}


def audit_input_canaries(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                         params: PyTree, canaries: PyTree,
                         included: np.ndarray, *, delta: float,
                         k_pos: IntOrSeq, k_neg: IntOrSeq,
                         confidence: float = 0.95,
                         theoretical_epsilon: Optional[float] = None,
                         batch_size: int = 256) -> AuditResult:
  """One-run audit of a finished training run from its input-space canaries.

  Score of canary i = -loss_fn(params, canary_i) under the final ``params``
  (low loss -> guessed member); then ``one_run_audit``. ``included`` must be
  the ``choose_included`` draw that decided which canaries were trained on.
  ``theoretical_epsilon`` is the run's accountant epsilon at ``delta``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` on ONE example.
    params: final model parameters.
    canaries: batch pytree of all canaries (included or not), leading axis m.
    included: bool[m].
    delta, k_pos, k_neg, confidence: as in ``one_run_audit``.
    theoretical_epsilon: reported beside the bound.
    batch_size: canaries scored per vmap chunk.

  Returns:
    AuditResult (method "one_run").
  """
  per_ex = lambda ex: -loss_fn(params, ex)
  scores = jax.lax.map(per_ex, canaries, batch_size=batch_size)
  return one_run_audit(np.asarray(scores), included, k_pos, k_neg, delta,
                       confidence, theoretical_epsilon=theoretical_epsilon)


# ---------------------------------------------------- white-box DP-step audit


def gaussian_step_scores(l2_clip_norm: float, noise_multiplier: float,
                         included: np.ndarray, *, canaries_per_step: int,
                         seed: int, canary_norm: Optional[float] = None
                         ) -> np.ndarray:
  """White-box scores of Dirac canaries through the real DP step.

  The m = ``included.size`` canaries are split into m / d steps of
  d = ``canaries_per_step``. Each step's batch holds its d canaries, example
  j with loss <params, direction_j> (gradient = direction_j, a Dirac canary
  of norm ``canary_norm``, default 2C, so clipping must cut it to C), mask =
  ``included``; ``clipping.clipped_grad`` sums, ``noise.privatize`` adds the
  noise (key ``fold_in(PRNGKey(seed), step)``) and divides by d / 2; the score
  of a canary is <noisy update, its unit direction>. Every canary is in one
  step only and steps draw independent noise, so w.r.t. each canary the whole
  computation is ONE Gaussian mechanism (parallel composition).

  Returns:
    float64 [m] scores, in the order of ``included``.
  """
  m, d = included.size, canaries_per_step
  if m % d:
    raise ValueError(f"num canaries {m} must be divisible by "
                     f"canaries_per_step {d}.")
  norm = 2.0 * l2_clip_norm if canary_norm is None else canary_norm
  directions = dirac_canaries(jnp.zeros(d), d, seed, l2_norm=norm)
  loss = lambda p, ex: jnp.vdot(p, ex["direction"])
  clipped_sum = clipping.clipped_grad(loss, l2_clip_norm)
  base_key = jax.random.PRNGKey(seed)
  params = jnp.zeros(d, jnp.float32)

  def one_step(args):
    step, mask = args
    total, _ = clipped_sum(params, {"direction": directions}, mask)
    update = noise.privatize(total, jax.random.fold_in(base_key, step),
                             l2_clip_norm, noise_multiplier, d / 2)
    return canary_scores(update, directions)

  masks = jnp.asarray(included.reshape(m // d, d), jnp.float32)
  chunk = int(max(1, min(m // d, 2**22 // (d * d))))
  run = jax.jit(lambda s, k: jax.lax.map(one_step, (s, k), batch_size=chunk))
  scores = run(jnp.arange(m // d), masks)
  return np.asarray(scores, np.float64).ravel()


def bandmf_step_scores(l2_clip_norm: float, noise_multiplier: float,
                       bands: int, included: np.ndarray, *,
                       canaries_per_step: int, seed: int,
                       canary_norm: Optional[float] = None) -> np.ndarray:
  """White-box scores of Dirac canaries through the real BandMF step.

  As ``gaussian_step_scores``, with ``bandmf.bandmf_noise`` (key
  ``seed``) instead of fresh noise: step s's d canaries sit on coordinates
  (s mod b) * d + j of a d * b vector, so canaries sharing a coordinate are
  b steps apart (the b-cyclic participation the accounting assumes), and
  b - 1 canary-free steps close the run. The adversary undoes the
  correlation: with y the noisy updates and C the strategy, C y = C x + z
  (white noise); canary (s, j)'s score is sum_i c_i (C y)[s + i] at its
  coordinate, the matched filter of its column of C (norm 1). W.r.t. each
  canary this is ONE Gaussian mechanism with noise multiplier sigma.

  Returns:
    float64 [m] scores, in the order of ``included``.
  """
  m, d, b = included.size, canaries_per_step, bands
  if m % d:
    raise ValueError(f"num canaries {m} must be divisible by "
                     f"canaries_per_step {d}.")
  steps = m // d
  norm = 2.0 * l2_clip_norm if canary_norm is None else canary_norm
  loss = lambda p, ex: jnp.vdot(p, ex["direction"])
  clipped_sum = clipping.clipped_grad(loss, l2_clip_norm)
  tx = bandmf.bandmf_noise(clipped_sum, noise_multiplier, d / 2, b,
                           seed=seed)
  params = jnp.zeros(d * b, jnp.float32)
  eye = norm * jnp.eye(d, dtype=jnp.float32)

  def one_step(state, args):
    step, mask = args
    block = (step % b) * d
    directions = jax.lax.dynamic_update_slice(
        jnp.zeros((d, d * b), jnp.float32), eye, (0, block))
    total, _ = clipped_sum(params, {"direction": directions}, mask)
    update, state = tx.update(total, state)
    return state, update

  masks = np.zeros((steps + b - 1, d), np.float32)  # b - 1 closing steps.
  masks[:steps] = included.reshape(steps, d)
  _, ys = jax.jit(lambda s, k: jax.lax.scan(one_step, tx.init(params),
                                            (s, k)))(
      jnp.arange(steps + b - 1), jnp.asarray(masks))
  cy = bandmf.strategy_matrix(b, steps + b - 1) @ np.asarray(ys, np.float64)
  c = bandmf.coefficients(b)
  s = np.arange(steps)
  cols = (s % b)[:, None] * d + np.arange(d)[None, :]
  scores = sum(c[i] * np.take_along_axis(cy[s + i], cols, axis=1)
               for i in range(b))
  return scores.ravel()


def blt_step_scores(l2_clip_norm: float, noise_multiplier: float,
                    min_separation: int, included: np.ndarray, *, steps: int,
                    seed: int, buffers: int = 4,
                    canary_norm: Optional[float] = None,
                    microbatch_size: int = 500) -> np.ndarray:
  """White-box scores of Dirac canaries through the real BLT step.

  The m = ``included.size`` canaries are split into b = ``min_separation``
  residue classes of d = m / b: canary (r, j) owns coordinate r d + j of an
  m-vector and takes part in EVERY step t = r (mod b) of the ``steps``-step
  phase: the worst participation pattern BLT's sensitivity Delta_n is
  computed for (r = 0). Its per-example gradient is a Dirac of norm
  ``canary_norm`` (default 2C), clipped by ``clipping.clipped_grad``; the
  noise is ``blt.blt_noise`` with the strategy ``blt.optimize(steps, b,
  buffers)`` (key ``seed``). The adversary undoes the correlation: with y the
  noisy updates, C y = C x + sigma C_clip Delta_n z, and canary (r, j)'s
  score is <(C y)[:, r d + j], v_r> / ||v_r||, v_r = C 1_{t = r mod b}, the
  matched filter of its participations. W.r.t. each canary this is ONE
  Gaussian mechanism with noise multiplier sigma Delta_n / ||v_r|| >= sigma.

  Returns:
    float64 [m] scores, in the order of ``included``.
  """
  m, b, n = included.size, min_separation, steps
  if m % b or n < b:
    raise ValueError(f"num canaries {m} must be divisible by min_separation "
                     f"{b}, and steps {n} >= it.")
  d = m // b
  norm = 2.0 * l2_clip_norm if canary_norm is None else canary_norm
  strategy = blt.optimize(n, b, buffers)
  # Example = its coordinate; gradient = norm * e_coord (a Dirac canary).
  loss = lambda p, ex: norm * p[ex["coord"]]
  clipped_sum = clipping.clipped_grad(loss, l2_clip_norm, method="vmap",
                                      microbatch_size=min(microbatch_size, d))
  tx = blt.blt_noise(clipped_sum, noise_multiplier, d / 2, strategy, n, b,
                     seed=seed)
  params = jnp.zeros(m, jnp.float32)
  masks = jnp.asarray(included.reshape(b, d), jnp.float32)

  def one_step(state, step):
    r = step % b
    coords = r * d + jnp.arange(d, dtype=jnp.int32)
    total, _ = clipped_sum(params, {"coord": coords}, masks[r])
    update, state = tx.update(total, state)
    return state, update

  _, ys = jax.jit(lambda t: jax.lax.scan(one_step, tx.init(params), t))(
      jnp.arange(n))
  c = blt.strategy_matrix(*strategy, n)
  cy = c @ np.asarray(ys, np.float64)  # [n, m]
  pattern = (np.arange(n)[None, :] % b) == np.arange(b)[:, None]  # [b, n]
  v = pattern.astype(np.float64) @ c.T  # [b, n]: v_r = C 1_{S_r}
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  return np.einsum("trd,rt->rd", cy.reshape(n, b, d), v).ravel()


def audit_gaussian_step(l2_clip_norm: float, noise_multiplier: float,
                        num_canaries: int, *, method: str = "one_run",
                        canaries_per_step: Optional[int] = None,
                        delta: float = 1e-6, confidence: float = 0.95,
                        k_fractions: Sequence[float] = (1 / 300, 1 / 100,
                                                        1 / 30),
                        seed: int = 0,
                        noise_scale_error: float = 1.0,
                        mechanism=None) -> AuditResult:
  """White-box audit of the DP step (clip -> sum -> Gaussian noise).

  Runs ``gaussian_step_scores`` (or, with ``mechanism`` a
  ``privacy.mechanisms.Mechanism``, its ``canary_scores``: e.g. BandMF's
  ``bandmf_step_scores``, BLT's ``blt_step_scores`` over its steps; the
  claim per canary is the same for all) with noise multiplier
  ``noise_multiplier * noise_scale_error`` (1.0: the real step; 0.5: a
  deliberately broken step with half the noise; 0: no noise), and compares
  the empirical bound with the epsilon CLAIMED for ``noise_multiplier``:
  ``accounting.epsilon(noise_multiplier, 1.0, 1, delta)`` (one unsampled
  Gaussian mechanism; inf if ``noise_multiplier`` is 0).

  method "one_run": ``one_run_audit`` with k_pos = k_neg = f * m for f in
  ``k_fractions`` (Bonferroni over the fractions); default
  ``canaries_per_step`` 1000. method "many_run": the classic test, one canary
  per step (default ``canaries_per_step`` 1), ``many_run_audit`` with a
  held-out threshold over the m = ``num_canaries`` steps.

  >>> r = audit_gaussian_step(1.0, 1.0, 20000, seed=0)
  >>> round(r.theoretical_epsilon, 2), r.empirical_epsilon < 4.89
  (4.89, True)

  Returns:
    AuditResult; counts also hold the noise multipliers used.
  """
  if method not in ("one_run", "many_run"):
    raise ValueError(f"method must be 'one_run' or 'many_run', got "
                     f"{method!r}.")
  if canaries_per_step is None:
    canaries_per_step = 1000 if method == "one_run" else 1
  included = choose_included(num_canaries, seed)
  score = (gaussian_step_scores if mechanism is None
           else mechanism.canary_scores)
  scores = score(l2_clip_norm, noise_multiplier * noise_scale_error,
                 included, canaries_per_step=canaries_per_step, seed=seed + 1)
  theory = (math.inf if noise_multiplier == 0 else
            float(accounting.epsilon(noise_multiplier, 1.0, 1, delta)))
  if method == "one_run":
    ks = [max(1, int(round(f * num_canaries))) for f in k_fractions]
    result = one_run_audit(scores, included, ks, ks, delta, confidence,
                           theoretical_epsilon=theory)
  else:
    result = many_run_audit(scores[included], scores[~included], delta,
                            confidence, seed=seed, theoretical_epsilon=theory)
  counts = dict(result.counts, noise_multiplier=noise_multiplier,
                noise_multiplier_used=noise_multiplier * noise_scale_error,
                canaries_per_step=canaries_per_step)
  return dataclasses.replace(result, counts=counts)
