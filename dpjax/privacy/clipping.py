"""Per-example gradients and per-example clipping.

Convention: ``loss_fn(params, example) -> scalar`` takes ONE example (a pytree
with no batch axis); a batch is the same pytree with a leading batch axis on
every leaf; ``mask`` is a ``[B]`` array of 1 (real) / 0 (padding).

``clipped_grad`` returns the SUM over real examples of clipped per-example
gradients. It adds no noise: feed the sum to ``noise.add_noise`` (or
``noise.privatize``), which adds one Gaussian draw and divides by the
EXPECTED batch size. Only aggregates leave this module (sums and counts),
never per-example norms or losses.

Non-finite rows: a real row whose per-example gradient has a NaN/inf
coordinate has a NaN/inf global norm (one ``isfinite`` on the norm detects
it; a norm that overflows float32 counts as non-finite too). Its clip factor
is 0 and its gradient row is set to 0 before the sum (never only multiplied
by 0: 0 * NaN is NaN), so it contributes exactly zero; it is counted in
``aux["num_nonfinite"]``.

Speed: the sum is one contraction of the ``[B]`` clip factors with the
per-example gradients (``tensordot``, as plain ``vmap(grad)`` clipping),
not an elementwise scale + select + reduce over ``B x params`` (2.2x vs
1.2x a non-private ViT step on CPU, issue #24). Non-finite rows are zeroed
in place by a loop that runs only if there is one, so the common all-finite
step pays nothing for the NaN safety (``benchmarks/clip_sum_variants.py``).
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from dpjax.privacy import rows

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

_CLIPPING_MODES = ("clip", "normalize")
# Neighbouring relations a BoundedSum states: add/remove one example, or
# all the data of one user.
UNITS = ("example", "user")


@dataclasses.dataclass(frozen=True)
class BoundedSum:
  """A clipped-sum function together with the sensitivity of its output.

  ``fn(params, batch, mask=None) -> (sum, aux)``. Guarantee stated by the
  constructor of the object (``clipped_grad``, ``user_level.
  clipped_delta_sum``): for datasets that differ by adding or removing one
  privacy ``unit`` ("example", or "user": all of one user's data), the sum
  moves by at most ``l2_sensitivity`` in L2 norm. ``noise.add_noise`` reads
  the bound from here, so the noise can never be calibrated to a different
  norm than the one the sum was clipped to.

  >>> f = clipped_grad(lambda w, x: jnp.sum(w * x), 2.0)
  >>> f.l2_sensitivity, f.unit
  (2.0, 'example')
  """
  fn: Callable[..., tuple[PyTree, dict]]
  l2_sensitivity: float
  unit: str = "example"

  def __post_init__(self):
    if not self.l2_sensitivity > 0:
      raise ValueError(f"l2_sensitivity must be > 0, got "
                       f"{self.l2_sensitivity}.")
    if self.unit not in UNITS:
      raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}.")

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


def per_example_grads(loss_fn: LossFn) -> Callable[[PyTree, PyTree], PyTree]:
  """Per-example gradients by ``vmap(grad(loss_fn))``.

  >>> f = per_example_grads(lambda w, x: jnp.sum(w * x))
  >>> f(jnp.ones(2), jnp.array([[1., 2.], [3., 4.]])).tolist()
  [[1.0, 2.0], [3.0, 4.0]]

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` on ONE example.

  Returns:
    ``fn(params, batch) -> grads``: a pytree like ``params`` whose leaves have
    a leading batch axis ``[B, *param.shape]``.
  """
  return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm of all leaves of ``tree`` together, computed in float32.

  >>> float(global_norm({"a": jnp.array([3.]), "b": jnp.array([4.])}))
  5.0
  """
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in leaves))


def clip_pytree(tree: PyTree, l2_clip_norm: float) -> tuple[PyTree, jax.Array]:
  """Scales ``tree`` by ``min(1, C / ||tree||)``.

  Formal guarantees: the returned tree has global L2 norm <= ``l2_clip_norm``
  (up to float rounding); a tree already within the bound is unchanged; a
  tree whose norm is not finite (a NaN/inf leaf) becomes exactly zero.

  >>> clipped, norm = clip_pytree({"w": jnp.array([3., 4.])}, 1.0)
  >>> float(norm), [round(v, 4) for v in clipped["w"].tolist()]
  (5.0, [0.6, 0.8])

  Args:
    tree: pytree of arrays (one example's gradient).
    l2_clip_norm: clip norm C > 0.

  Returns:
    ``(clipped_tree, norm)`` where ``norm`` is the pre-clip global norm.
  """
  norm = global_norm(tree)
  factor = rows.clip_factor(norm, l2_clip_norm)
  finite = jnp.isfinite(norm)
  return jax.tree_util.tree_map(
      lambda x: jnp.where(finite, x * factor, 0).astype(x.dtype), tree), norm


def _clipped_sum_fn(loss_fn: LossFn, l2_clip_norm: float, clipping: str,
                    normalize_gamma: float):
  """fn(params, batch, mask) -> (clipped sum, aux) without microbatching."""
  value_and_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))

  def fn(params, batch, mask):
    losses, grads = value_and_grad(params, batch)
    norms = jax.vmap(global_norm)(grads)  # [B], stays inside this function.
    real = mask > 0
    # A row's norm is NaN/inf iff one of its coordinates is (or it overflows):
    # such rows (real or padding) are zeroed before the contraction, and
    # their factor, like that of padding rows, is 0.
    finite = jnp.isfinite(norms)
    factor = jnp.where(
        real & finite,
        rows.scale_factor(norms, l2_clip_norm, clipping, normalize_gamma),
        0.0)
    clipped_sum = rows.weighted_row_sum(grads, factor, finite)
    return clipped_sum, rows.clip_aux(losses, norms, real, finite,
                                      l2_clip_norm)

  return fn


def _to_microbatches(x: jax.Array, num_micro: int, micro: int) -> jax.Array:
  # [B, ...] -> [micro, num_micro, ...] -> [num_micro, micro, ...]. Row
  # i * num_micro + j goes to microbatch j, so with a batch sharded over a
  # "data" axis each microbatch keeps rows from every device (the reshape and
  # transpose are local) and the scan runs data-parallel.
  x = x.reshape((micro, num_micro) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def clipped_grad(
    loss_fn: LossFn,
    l2_clip_norm: float,
    *,
    microbatch_size: Optional[int] = None,
    clipping: str = "clip",
    normalize_gamma: float = 0.01,
    method: str = "auto",
    compute_dtype: Optional[Any] = None,
) -> Callable[[PyTree, PyTree, Optional[jax.Array]], tuple[PyTree, dict]]:
  """Sum over real examples of clipped per-example gradients.

  Formal guarantees: each real example contributes a vector of L2 norm at
  most C = ``l2_clip_norm`` ("clip": g * min(1, C/||g||); "normalize":
  fastDP's automatic clipping g * C / (||g|| + gamma), norm < C), so adding or
  removing one example changes the sum by at most C in L2. Rows with
  ``mask == 0`` contribute exactly zero, even if their data or gradient is
  NaN/inf. Real rows whose gradient is non-finite (a NaN/inf coordinate, so
  a NaN/inf per-example norm) also contribute exactly zero (clip factor 0,
  row zeroed before the sum), so the sensitivity bound holds and
  their presence cannot be read from the sum (it stays finite). No noise is
  added here. ``aux`` holds only aggregates over real rows (these are NOT
  private; log them as such): ``loss_sum`` (finite losses only),
  ``grad_norm_sum`` (pre-clip norms, finite ones only), ``num_clipped``
  (finite rows with norm > C), ``count`` (real rows), ``num_nonfinite``
  (real rows whose gradient was non-finite). Under ``jit`` with the batch
  sharded over a mesh axis (``NamedSharding(mesh, P("data"))``) the sum
  reduces across devices.

  >>> fn = clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
  >>> s, aux = fn(jnp.zeros(2), jnp.array([[3., 4.], [.3, .4], [9., 9.]]),
  ...             jnp.array([1., 1., 0.]))
  >>> [round(v, 4) for v in s.tolist()], float(aux["count"])
  ([0.9, 1.2], 2.0)

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` on ONE example.
    l2_clip_norm: clip norm C > 0.
    microbatch_size: if set, the batch is split into microbatches of this many
      rows, processed by ``lax.scan`` so peak memory is O(microbatch_size *
      params); the batch size must be divisible by it.
    clipping: "clip" (standard) or "normalize" (automatic clipping).
    normalize_gamma: stabiliser gamma > 0 of "normalize".
    method: how per-example norms are computed. "auto" (default) / "ghost":
      fast clipping (``ghost.py``: ghost norms + book-keeping, no per-example
      gradients for Flax Dense / DenseGeneral / patch Conv / Embed layers,
      exact per-example gradients by vmap for all other params, so any JAX
      function works; "auto" picks the cheaper norm formula per layer).
      "vmap": per-example gradients of every param by vmap. Same guarantee
      and outputs (to float rounding); "auto"/"ghost" import Flax lazily.
      "auto" is the default because it was at least as fast as "vmap" on
      every model of ``benchmarks/peers.py`` and never uses more memory.
    compute_dtype: "ghost"/"auto" only: operand dtype of the norm and sum
      matmuls (e.g. jnp.bfloat16); norms and sums stay float32.

  Returns:
    A ``BoundedSum`` (sensitivity C per example): ``fn(params, batch,
    mask=None) -> (clipped_sum, aux)``; ``clipped_sum`` is a float32 pytree
    like ``params``; ``aux`` a dict of float32 scalars.

  Raises:
    ValueError: for an unknown ``clipping`` or a batch size not divisible by
      ``microbatch_size``.
  """
  if clipping not in _CLIPPING_MODES:
    raise ValueError(f"clipping must be one of {_CLIPPING_MODES}, got "
                     f"{clipping!r}.")
  if l2_clip_norm <= 0:
    raise ValueError(f"l2_clip_norm must be > 0, got {l2_clip_norm}.")
  if clipping == "normalize" and normalize_gamma <= 0:
    raise ValueError(f"normalize_gamma must be > 0, got {normalize_gamma}.")
  # --- Fast-clipping dispatch (owner: privacy/ghost.py). Flax is imported
  # only here, so `import dpjax.privacy` stays Flax-free. ---
  if method == "vmap":
    if compute_dtype is not None:
      raise ValueError("compute_dtype applies to method='ghost'/'auto' only.")
    inner = _clipped_sum_fn(loss_fn, l2_clip_norm, clipping, normalize_gamma)
  elif method in ("ghost", "auto"):
    from dpjax.privacy import ghost  # pylint: disable=g-import-not-at-top
    inner = ghost.clipped_sum_fn(
        loss_fn, l2_clip_norm, method=method, clipping=clipping,
        normalize_gamma=normalize_gamma, compute_dtype=compute_dtype)
  else:
    raise ValueError("method must be 'vmap', 'ghost' or 'auto', got "
                     f"{method!r}.")
  # --- end of fast-clipping dispatch. ---

  def fn(params, batch, mask=None):
    batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if mask is None:
      mask = jnp.ones((batch_size,), jnp.float32)
    if microbatch_size is None or microbatch_size >= batch_size:
      if microbatch_size is not None and microbatch_size != batch_size:
        raise ValueError(f"batch size {batch_size} must be divisible by "
                         f"microbatch_size {microbatch_size}.")
      return inner(params, batch, mask)
    if batch_size % microbatch_size:
      raise ValueError(f"batch size {batch_size} must be divisible by "
                       f"microbatch_size {microbatch_size}.")
    num_micro = batch_size // microbatch_size
    split = lambda x: _to_microbatches(x, num_micro, microbatch_size)
    xs = (jax.tree_util.tree_map(split, batch), split(mask))
    init = jax.eval_shape(inner, params, jax.tree_util.tree_map(
        lambda x: x[:microbatch_size], batch), mask[:microbatch_size])
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), init)

    def body(carry, micro):
      out = inner(params, *micro)
      return jax.tree_util.tree_map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(body, init, xs)
    return total

  return BoundedSum(fn, float(l2_clip_norm), "example")
