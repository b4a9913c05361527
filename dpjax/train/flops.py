"""Matmul/conv FLOPs of a function from its jaxpr, loops counted in full.

XLA's cost_analysis counts a while loop's body once (lax.scan over local
steps, inner microbatches); this walks the jaxpr instead and multiplies each
scan body by its length. It counts dot_general and conv_general_dilated
only (2 FLOPs per multiply-add), the terms that dominate a transformer or
CNN step; a while_loop of unknown trip count is counted once.
"""

import math

import jax
from jax.extend import core


def _dot(eqn) -> float:
  (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  k = math.prod(lhs[d] for d in lc)
  batch = math.prod(lhs[d] for d in lb)
  m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  n = math.prod(s for d, s in enumerate(rhs)
                if d not in rc and d not in eqn.params["dimension_numbers"][1][1])
  return 2.0 * batch * m * n * k


def _conv(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  o_dim = dn.rhs_spec[0]
  # Per output element: one MAC per kernel element except the out-feature dim.
  macs_per_out = math.prod(rhs) / rhs[o_dim]
  groups = eqn.params.get("feature_group_count", 1) * eqn.params.get(
      "batch_group_count", 1)
  return 2.0 * math.prod(out) * macs_per_out / max(groups, 1)


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, core.Jaxpr):
        yield x


def jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot(eqn)
    elif name == "conv_general_dilated":
      total += _conv(eqn)
    else:
      times = eqn.params.get("length", 1) if name == "scan" else 1
      for sub in _sub_jaxprs(eqn):
        total += times * jaxpr_flops(sub)
  return total


def count(fn, *args) -> float:
  """FLOPs of fn(*args) (abstract args fine), loops counted in full."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
