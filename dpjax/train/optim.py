"""config.train -> the optimizer and learning-rate schedule, and the train
block's validation (errors name the field, the value and the fix).

The recipes build their phases' optimizers here; the loop checks the train
block against the device count before it builds anything.
"""

import ml_collections
import optax

from dpjax import errors


def _fail(field: str, value, fix: str):
  raise errors.config_error(field, value, fix)


def schedule_from_config(t: ml_collections.ConfigDict, steps: int | None = None):
  """Linear warm-up then cosine over `decay_steps` (may exceed steps)."""
  steps = steps or t.steps
  decay = t.decay_steps or steps
  if t.warmup_steps >= decay:
    _fail("train.warmup_steps", t.warmup_steps,
          f"must be < the cosine horizon {decay} (train.decay_steps)")
  return optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, decay, end_value=0.0)


def optimizer_from_config(t: ml_collections.ConfigDict, steps: int | None = None
                          ) -> optax.GradientTransformation:
  """AdamW (decoupled decay on all params) or SGD(+momentum) with schedule."""
  lr = schedule_from_config(t, steps)
  if t.optimizer == "adamw":
    opt = optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  elif t.optimizer == "sgd":
    opt = optax.sgd(lr, momentum=t.momentum or None)
  else:
    _fail("train.optimizer", t.optimizer, 'use "adamw" or "sgd"')
  return opt


def validate_train(t: ml_collections.ConfigDict, num_devices: int):
  """Checks the train block against the device count."""
  for field in ("steps", "batch_size", "microbatch_size"):
    if t[field] <= 0:
      _fail(f"train.{field}", t[field], "must be positive")
  if t.microbatch_size % num_devices:
    _fail("train.microbatch_size", t.microbatch_size,
          f"must be a multiple of the {num_devices} devices")
  if t.inner_microbatch and (t.microbatch_size // num_devices) % t.inner_microbatch:
    _fail("train.inner_microbatch", t.inner_microbatch,
          "must divide the per-device microbatch")
  if t.dtype not in ("float32", "bfloat16"):
    _fail("train.dtype", t.dtype, 'use "float32" or "bfloat16"')
