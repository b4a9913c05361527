"""The per-phase plan: the noise's bound comes from the phase's sum function."""

import jax.numpy as jnp
import optax
import pytest

from configs import dp_linear
from dpjax.privacy import clipping
from dpjax.train import phase_plan
from dpjax.train import task as task_lib


def _phase(**kw):
  loss = lambda params, example: jnp.sum(params["w"] * example["x"])
  return task_lib.Phase(**dict(
      dict(name="dp", private=True, source=[{"x": 1.0}] * 100, transforms=(),
           loss_fn=loss, steps=10, batch_size=10, optimizer=optax.sgd(1.0)),
      **kw))


def test_private_phase_needs_a_sum_that_states_its_sensitivity():
  config = dp_linear.get_config()
  config.privacy.noise_multiplier = 1.0
  plan, = phase_plan.resolve_phases(config, [_phase()])
  assert (plan.l2_sensitivity, plan.unit) == (config.privacy.l2_clip_norm,
                                              "example")
  bounded = clipping.BoundedSum(lambda p, b, m: (p, {}), 0.25, "user")
  plan, = phase_plan.resolve_phases(config, [_phase(clipped_sum_fn=bounded)])
  assert (plan.l2_sensitivity, plan.unit) == (0.25, "user")
  with pytest.raises(ValueError, match="states no sensitivity"):
    phase_plan.resolve_phases(
        config, [_phase(clipped_sum_fn=lambda p, b, m: (p, {}))])


def test_the_phase_is_explicit_and_public_phases_have_no_mechanism():
  config = dp_linear.get_config()
  config.privacy.noise_multiplier = 1.0
  private, public = phase_plan.resolve_phases(
      config, [_phase(), _phase(name="warm", private=False)])
  assert (private.name, private.steps, private.batch_size) == ("dp", 10, 10)
  assert private.mechanism.name == "dpsgd"
  assert private.noise_signature() == private.mechanism.signature()
  assert public.mechanism is None and public.noise_signature() == {}
  assert not hasattr(private, "loss_fn")  # No forwarding: plan.phase.x.
  assert private.phase.loss_fn is not None
