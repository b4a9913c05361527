"""dpjax.privacy: the differentially private core of dpjax.

Importable alone: depends only on jax, numpy, optax and dp_accounting (no
Flax, Grain or TFDS). The DP step is

  sum_fn = clipped_grad(loss_fn, C)      # a BoundedSum: sensitivity C
  clipped_sum, aux = sum_fn(params, batch, mask)
  opt = optax.chain(add_noise(sum_fn, sigma, q * N), optimizer)
  updates, opt_state = opt.update(clipped_sum, opt_state, params)

with batches from ``poisson_sample(secret_seed(), step, ...)`` and the budget
from ``epsilon`` / ``PrivacyLedger``. The noise key (in the optimizer state)
and the sampling seed are secret OS entropy by default; an int seed is for
tests only. See each module's docstring for the formal guarantees.
``bandmf_noise`` replaces ``add_noise`` with noise correlated across steps
(banded matrix factorization; its accounting and sampler are in ``bandmf``);
``blt_noise`` with noise correlated over all steps through a few buffers
(buffered-linear-Toeplitz; strategy and accounting in ``blt``).
``mechanisms`` ties each mechanism's sampler, noise transform and accounting
into one object per phase, keyed by ``config.privacy.mechanism``.
"""

from dpjax.privacy import accounting
from dpjax.privacy import bandmf
from dpjax.privacy import blt
from dpjax.privacy import clipping
from dpjax.privacy import ledger
from dpjax.privacy import mechanisms
from dpjax.privacy import noise
from dpjax.privacy import optimizers
from dpjax.privacy import sampling

from dpjax.privacy.accounting import calibrate_noise_multiplier
from dpjax.privacy.accounting import dp_event
from dpjax.privacy.accounting import epsilon
from dpjax.privacy.accounting import event_epsilon
from dpjax.privacy.accounting import tan_simulation
from dpjax.privacy.accounting import total_amount_of_noise
from dpjax.privacy.bandmf import bandmf_noise
from dpjax.privacy.blt import blt_noise
from dpjax.privacy.clipping import BoundedSum
from dpjax.privacy.clipping import clip_pytree
from dpjax.privacy.clipping import clipped_grad
from dpjax.privacy.clipping import global_norm
from dpjax.privacy.clipping import per_example_grads
from dpjax.privacy.ledger import PrivacyLedger
from dpjax.privacy.noise import add_noise
from dpjax.privacy.noise import AddNoiseState
from dpjax.privacy.noise import dp_aggregate
from dpjax.privacy.noise import privatize
from dpjax.privacy.noise import secret_key
from dpjax.privacy.optimizers import dpadamw
from dpjax.privacy.optimizers import dpsgd
from dpjax.privacy.sampling import max_batch_size_for
from dpjax.privacy.sampling import poisson_sample
from dpjax.privacy.sampling import PoissonBatch
from dpjax.privacy.sampling import sample_indices
from dpjax.privacy.sampling import secret_seed
from dpjax.privacy.sampling import shard_for_process

from dpjax.privacy import audit  # pylint: disable=g-bad-import-order
from dpjax.privacy.audit_stats import AuditResult
