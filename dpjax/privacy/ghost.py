"""Fast per-example clipping for Flax models: ghost norms + book-keeping.

``privacy.clipped_grad(..., method="ghost" | "auto")`` lands here (this module
imports Flax, so ``dpjax.privacy`` imports it lazily). The contract is the
one of ``clipping.clipped_grad``: ``loss_fn(params, example)`` on ONE
example; ``fn(params, batch, mask) -> (clipped_sum, aux)``.

How. ``loss_fn`` is vmapped over the batch inside ``nn.intercept_methods``.
A first abstract trace (``jax.make_jaxpr``, no FLOPs) finds every call of a
supported layer (``ghost_layers.describe``: Dense, DenseGeneral, patch Conv,
Embed), the params it reads (by tracer identity), and, from the jaxpr, every
other use of those params. Calls reading the same params form a group (one
call, or a layer called K times, e.g. on K augmented copies of an example:
its per-example gradient sums over the calls, so their rows are
concatenated into one call of sum(T) rows). A group takes the fast path
("ghost") only if its params are used by its calls and nothing else (a
tied ``Embed.attend``, a param read outside the layer, a layer inside
``nn.remat``/``nn.scan`` or a cast of the params all fail this). All
other params take the exact fallback ("copy"): the same per-example
backward (``vmap(grad)``) returns their per-example gradients (cheap for
LayerNorm, biases, position embeddings, CLS tokens). Unused params get
zeros.

The real pass adds a zero ``z`` (per example, shaped like the output) to
each ghost call's output and records its input: ONE backward w.r.t. ``z``
and the fallback params gives ``g_i = dloss_i/dy_i`` for every layer,
without any weight gradient. Norms then come from ``ghost_layers.sq_norms``
and the clipped sum from one book-keeping matmul per layer (no second
backward).
Layers reading the very same input tensor (query/key/value) share the stored
activation and its Gram matrix. Cost over a non-private step: the norm
matmuls, min(2T^2(d_in/share + d_out), 2T d_in d_out) per example and layer,
i.e. about 0.3x the weight-gradient FLOPs at ViT-B/16 shapes but ~1x at
narrow CPU sizes (width 96-192); measured, 1.2-1.3x the time of a `jax.grad`
step for ViT encoders on CPU (benchmarks/RESULTS.md).

Formal guarantee (as ``clipping.clipped_grad``): each real example adds a
vector of L2 norm <= C ("clip") or < C ("normalize") to the sum, computed
from its exact per-example gradient norm (float rounding aside), so one
example changes the sum by at most C; ``mask == 0`` rows add exactly zero
even when their data or gradients are NaN/inf. Real rows whose gradient is
non-finite (a NaN/inf per-example norm, which a NaN/inf coordinate of any
layer's gradient, stored activation or output gradient makes it) also add
exactly zero: clip factor 0, and their rescaled output gradients, their stored
activations and their fallback per-example grads are selected away with
``where`` before the book-keeping matmuls (0 * NaN would be NaN), so the
sensitivity bound holds and their presence cannot be read from the sum; they
are counted in ``aux["num_nonfinite"]``. ``aux`` holds only aggregates (not
private). Assumes, like vmap clipping, that ``loss_fn`` is a function of one
example (no cross-example state).
"""

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.privacy import ghost_layers
from dpjax.privacy import rows

PyTree = Any
_METHODS = ("ghost", "auto")
_LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)


def _mark(k: int) -> str:
  return f"dpjax_ghost_{k}_"


def _is_candidate(ctx) -> bool:
  return isinstance(ctx.module, _LAYER_TYPES) and ctx.method_name != "setup"


def _module_params(module) -> dict:
  try:
    variables = module.variables
  except Exception:  # pylint: disable=broad-except  (unbound/lifted scope)
    return {}
  params = flax.core.unfreeze(variables).get("params", {})
  return {"/".join(k): v for k, v in
          flax.traverse_util.flatten_dict(params).items()}


def _analyze(loss_fn, leaves, treedef, batch, method) -> dict:
  """Abstract trace -> plan: ghost calls and a mode per param leaf."""
  calls = []

  def per_example(leaves_, example):
    ids = {id(x): i for i, x in enumerate(leaves_)}

    def icpt(next_fun, args, kwargs, ctx):
      if not _is_candidate(ctx):
        return next_fun(*args, **kwargs)
      k, mod = len(calls), ctx.module
      params = _module_params(mod)
      desc = ghost_layers.describe(mod, ctx.method_name, args, kwargs)
      if (desc is not None and "kernel_shape" in desc and
          tuple(getattr(params.get("kernel"), "shape", ())) !=
          desc["kernel_shape"]):
        desc = None  # Unexpected kernel layout: exact fallback.
      rec = dict(path=tuple(mod.scope.path), leaf_of={
          n: ids.get(id(v)) for n, v in params.items()}, desc=desc)
      calls.append(rec)
      with jax.named_scope(_mark(k)):
        y = next_fun(*args, **kwargs)
      if rec["desc"] is not None:
        rec["t"] = ghost_layers.to_matrix(rec["desc"], mod, args[0]).shape[0]
        rec["out"] = jax.ShapeDtypeStruct(y.shape, y.dtype)
        rec["input"] = args[0]  # Strong ref: `is` finds shared inputs.
        rec["dtype"] = mod.dtype or jnp.promote_types(
            args[0].dtype, getattr(mod, "param_dtype", jnp.float32))
      return y

    with nn.intercept_methods(icpt):
      return loss_fn(treedef.unflatten(leaves_), example)

  closed = jax.make_jaxpr(jax.vmap(per_example, in_axes=(None, 0)))(
      leaves, batch)
  jaxpr = closed.jaxpr
  consumers = {i: [] for i in range(len(leaves))}
  pos = {id(v): i for i, v in enumerate(jaxpr.invars[:len(leaves)])}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if id(v) in pos:
        consumers[pos[id(v)]].append(str(eqn.source_info.name_stack))
  for v in jaxpr.outvars:
    if id(v) in pos:
      consumers[pos[id(v)]].append("<output>")
  claims = {}
  for k, rec in enumerate(calls):
    for leaf in rec["leaf_of"].values():
      if leaf is not None:
        claims.setdefault(leaf, []).append(k)

  # Calls reading the same params form a group (a layer called K times,
  # e.g. on K augmented copies of one example): its per-example gradient is
  # the sum over the calls, i.e. the concatenation of their rows, so the
  # norm and the book-keeping treat the group as one call of sum(T) rows.
  by_leaves: dict[tuple, list[int]] = {}
  for k, rec in enumerate(calls):
    by_leaves.setdefault(tuple(sorted(rec["leaf_of"].items())), []).append(k)
  ghost_calls, groups, mode = [], [], ["copy"] * len(leaves)
  for ks in by_leaves.values():
    recs = [calls[k] for k in ks]
    desc, leaf_of = recs[0]["desc"], recs[0]["leaf_of"]
    marks = [_mark(k) for k in ks]
    ok = (desc is not None and set(leaf_of) == set(desc["params"]) and
          all(r["desc"] == desc and r["dtype"] == recs[0]["dtype"]
              for r in recs) and
          all(leaf is not None and claims[leaf] == ks and consumers[leaf]
              and all(any(m in s for m in marks) for s in consumers[leaf])
              for leaf in leaf_of.values()))
    if ok:
      groups.append(list(range(len(ghost_calls), len(ghost_calls) + len(ks))))
      ghost_calls += [dict(calls[k], index=k) for k in ks]
      for leaf in leaf_of.values():
        mode[leaf] = "ghost"
  single = {g[0] for g in groups if len(g) == 1}
  # Single Dense calls on the very same input tensor (query/key/value) share
  # one stored activation and one input Gram matrix: "leader" = first such.
  for j, rec in enumerate(ghost_calls):
    rec["leader"] = j if j not in single else next(
        i for i, r in enumerate(ghost_calls[:j + 1])
        if i in single and r["input"] is rec["input"] and
        _share_key(r) == _share_key(rec) or i == j)
  for g in groups:
    rec = ghost_calls[g[0]]
    share = sum(r["leader"] == rec["leader"] for r in ghost_calls)
    mode_g = ghost_layers.pick_mode(
        rec["desc"], sum(ghost_calls[j]["t"] for j in g), method, share)
    for j in g:
      ghost_calls[j]["mode"] = mode_g
  for rec in calls + ghost_calls:  # Drop the tracers.
    rec.pop("input", None)
  for i in range(len(leaves)):
    if mode[i] == "copy" and not consumers[i]:
      mode[i] = "zero"
  return dict(calls=ghost_calls, groups=groups, mode=mode,
              num_candidates=len(calls))


def _share_key(rec):
  desc = rec["desc"]
  return (desc["kind"], desc.get("layout"), desc.get("d_in"),
          desc.get("axis"), desc.get("patch"), desc.get("vocab"),
          jnp.dtype(rec["dtype"]))


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def clipping_plan(loss_fn, params: PyTree, batch: PyTree,
                  method: str = "auto") -> dict:
  """How each param leaf is handled (for inspection and tests; no FLOPs).

  Args:
    loss_fn: ``loss_fn(params, example)`` on one example.
    params: the params pytree (arrays or ShapeDtypeStructs).
    batch: a batch (leading batch axis), arrays or ShapeDtypeStructs.
    method: "ghost" or "auto".

  Returns:
    dict "/"-joined leaf key path -> "ghost:gram" | "ghost:outer" (fast path,
    with the norm formula) | "copy" (exact per-example fallback) | "zero"
    (param unused by the loss).
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  plan = _analyze(loss_fn, _abstract(leaves), treedef, _abstract(batch),
                  method)
  modes = list(plan["mode"])
  for rec in plan["calls"]:
    for leaf in rec["leaf_of"].values():
      modes[leaf] = "ghost:" + rec["mode"]
  paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  return dict(zip(paths, modes))


def clipped_sum_fn(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    l2_clip_norm: float,
    *,
    method: str = "auto",
    clipping: str = "clip",
    normalize_gamma: float = 0.01,
    compute_dtype: Optional[Any] = None,
) -> Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict]]:
  """Sum of clipped per-example gradients without per-example gradients.

  Same guarantee and outputs as ``clipping.clipped_grad`` (see module doc).

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` on ONE example; the
      model is called inside as ``model.apply({"params": ...}, ...)`` with
      leaves of ``params`` passed through unchanged (no cast / copy), or
      those params take the (exact, slower) fallback.
    l2_clip_norm: clip norm C > 0.
    method: "ghost" (Gram-matrix norms for every supported layer) or "auto"
      (per layer, Gram if 2 T^2 <= d_in d_out else the layer's per-example
      outer product; fastDP's rule).
    clipping: "clip" or "normalize" (automatic clipping, C/(||g|| + gamma)).
    normalize_gamma: gamma of "normalize".
    compute_dtype: operand dtype of the norm and book-keeping matmuls and of
      the stored activations; None = float32. jnp.bfloat16 halves their
      memory; accumulation, norms and sums stay float32.

  Returns:
    ``fn(params, batch, mask) -> (clipped_sum, aux)``: ``clipped_sum`` a
    float32 pytree like ``params`` (sum over rows with mask > 0 and a finite
    gradient); ``aux`` float32 scalars loss_sum, grad_norm_sum, num_clipped,
    count, num_nonfinite (as ``clipping.clipped_grad``).
  """
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
  dtype = jnp.dtype(compute_dtype or jnp.float32)
  cache = {}

  def fn(params, batch, mask):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    abs_leaves, abs_batch = _abstract(leaves), _abstract(batch)
    key = (treedef, tuple(abs_leaves), jax.tree_util.tree_structure(batch),
           tuple(jax.tree_util.tree_leaves(abs_batch)))
    if key not in cache:
      cache[key] = _analyze(loss_fn, abs_leaves, treedef, abs_batch, method)
    plan = cache[key]
    b = mask.shape[0]
    copy_ids = [i for i, m in enumerate(plan["mode"]) if m == "copy"]
    slot = {rec["index"]: j for j, rec in enumerate(plan["calls"])}
    copies = [leaves[i] for i in copy_ids]
    zs = [jnp.zeros(rec["out"].shape, rec["out"].dtype)
          for rec in plan["calls"]]

    real = mask > 0

    def per_example(copies_i, zs_i, example):
      lv = list(leaves)
      for j, i in enumerate(copy_ids):
        lv[i] = copies_i[j]
      acts, inputs, count = [None] * len(zs_i), {}, [0]

      def icpt(next_fun, args, kwargs, ctx):
        if not _is_candidate(ctx):
          return next_fun(*args, **kwargs)
        k = count[0]
        count[0] += 1
        if k not in slot:
          return next_fun(*args, **kwargs)
        rec = plan["calls"][slot[k]]
        if tuple(ctx.module.scope.path) != rec["path"]:
          raise RuntimeError("layer call order differs between the analysis "
                             f"trace and the real trace at {rec['path']}.")
        if rec["leader"] == slot[k]:
          inputs[slot[k]] = args[0]
          a = ghost_layers.to_matrix(rec["desc"], ctx.module, args[0])
          acts[slot[k]] = a if rec["desc"]["kind"] == "embed" else a.astype(
              dtype)
        elif inputs.get(rec["leader"]) is not args[0]:
          raise RuntimeError("shared layer input differs between the "
                             f"analysis and the real trace at {rec['path']}.")
        return next_fun(*args, **kwargs) + zs_i[slot[k]]

      with nn.intercept_methods(icpt):
        loss = loss_fn(treedef.unflatten(lv), example)
      return loss, acts

    # vmap(grad), the fallback params and the zs shared (in_axes None): each
    # example's backward sees only its own row. (A vjp of the vmapped loss
    # w.r.t. per-example copies [B, *shape] batches the kernel of a
    # non-patch Conv into a grouped conv, which XLA:CPU computes with 0 *
    # other rows: one NaN example made every row's norm NaN.)
    grad_fn = jax.vmap(
        jax.value_and_grad(per_example, argnums=(0, 1), has_aux=True),
        in_axes=(None, None, 0))
    (losses, acts), (g_copies, g_zs) = grad_fn(copies, zs, batch)

    def kept(x, keep):  # Rows not kept -> 0, even if x is NaN there.
      r = keep.reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.where(r, x, jnp.zeros((), x.dtype))

    sq = jnp.zeros((b,), jnp.float32)
    mats, grams = [], {}
    for group in plan["groups"]:
      rec = plan["calls"][group[0]]
      gs = [g_zs[j].reshape(b, plan["calls"][j]["t"], -1) for j in group]
      if len(group) == 1:
        a, g = acts[rec["leader"]], gs[0]
      else:  # One layer called len(group) times: its rows concatenated.
        a = jnp.concatenate([acts[j] for j in group], axis=1)
        g = jnp.concatenate(gs, axis=1)
      mats.append((rec, a, g))
      a_gram = None
      if (len(group) == 1 and rec["mode"] == "gram" and
          rec["desc"]["kind"] == "dense"):
        if rec["leader"] not in grams:
          grams[rec["leader"]] = ghost_layers.gram(a, dtype)
        a_gram = grams[rec["leader"]]
      sq = sq + ghost_layers.sq_norms(rec["desc"], rec["mode"], a, g, dtype,
                                      a_gram)
    for g in g_copies:
      sq = sq + jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(b, -1),
                        axis=1)
    norms = jnp.sqrt(sq)
    # A row's norm is NaN/inf if a coordinate of its per-example gradient,
    # or of an activation / output gradient entering the book-keeping
    # matmuls, is (0 * NaN and 0 * inf are NaN in the norm formulas): such
    # real rows are dropped like padding rows.
    finite = jnp.isfinite(norms)
    keep = real & finite
    factor = jnp.where(keep, rows.scale_factor(norms, l2_clip_norm, clipping,
                                               normalize_gamma), 0.0)

    out = [jnp.zeros(x.shape, jnp.float32) for x in leaves]
    # Fallback params: one contraction, non-finite rows zeroed in place.
    for i, s in zip(copy_ids, rows.weighted_row_sum(g_copies, factor, finite)):
      out[i] = s
    for rec, a, g in mats:
      # Dropped rows (padding or non-finite) of BOTH operands -> 0: the
      # book-keeping matmul sums over all rows, and 0 * NaN would leak such a
      # row's NaN into the sum. (Their norms may be NaN; `factor` and `aux`
      # select them away.)
      cg = kept(g.astype(jnp.float32) * factor[:, None, None], keep)
      if rec["desc"]["kind"] != "embed":
        a = kept(a, keep)
      shapes = {n: leaves[i].shape for n, i in rec["leaf_of"].items()}
      sums = ghost_layers.clipped_sums(rec["desc"], a, cg, shapes, dtype)
      for n, i in rec["leaf_of"].items():
        out[i] = sums[n]
    aux = rows.clip_aux(losses, norms, real, finite, l2_clip_norm)
    return treedef.unflatten(out), aux

  return fn
