"""Config pieces shared by every recipe: `base_config` and its blocks.

Every shared key is declared once here with a comment (`base_config`: the
run keys, the shared data keys, the privacy, train, mesh, audit and evals
blocks); a config file starts from `base_config(recipe)`, declares its
recipe's own keys with their comments, and overrides values, never adding
keys in code. `parse_arg("tiny,steps=10")` gives the preset name and
overrides.
"""

import ml_collections

from dpjax.privacy import mechanisms as privacy_mechanisms
from dpjax.train import stand_in


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses big_vision-style `configs/x.py:tiny,foo=1` arguments.

  Args:
    arg: the string after the colon, e.g. "tiny", "tiny,tan=8" or
      "paper,smoke"; may be None.
    **defaults: declared option names with default values; the first bare word
      sets `preset`, a later bare word sets a declared boolean option (a
      modifier such as `smoke`) to True.

  Returns:
    A ConfigDict with `preset` and the declared options.
  """
  out = ml_collections.ConfigDict(dict(preset="paper", **defaults))
  for i, part in enumerate(p for p in (arg or "").split(",") if p):
    if "=" not in part:
      if not i:
        out.preset = part
      elif isinstance(defaults.get(part), bool):
        out[part] = True
      else:
        raise ValueError(
            f"config arg {part!r}: only the first word is a preset; later "
            "words are modifiers: "
            f"{sorted(k for k, v in defaults.items() if isinstance(v, bool))}")
      continue
    key, value = part.split("=", 1)
    if key not in out:
      raise ValueError(
          f"config arg {key!r} unknown; valid: {sorted(out.keys())}")
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out


def base_config(recipe: str) -> ml_collections.ConfigDict:
  """The keys every config has, each declared once; a config file adds its
  recipe's own (model, phases, its data fields, ...) and overrides values.

  Args:
    recipe: the key of `dpjax.recipes.RECIPES`, which is also the name of
      the config file (configs/<recipe>.py) and of the recipe module
      (dpjax/recipes/<recipe>.py).
  """
  c = ml_collections.ConfigDict()
  c.recipe = recipe
  # Public randomness: initialisation, synthetic and public data, evaluators
  # (never the DP noise or the private sampling: privacy.*_seed).
  c.seed = 0
  # Only restore the latest checkpoint and evaluate (an empty workdir:
  # evaluate the initialisation).
  c.eval_only = False
  # Warm start: another run's workdir (its export/params, else its latest
  # checkpoint), read once when the run starts; "" = none.
  c.init_checkpoint = ""
  c.data = ml_collections.ConfigDict(dict(
      # Records that cannot be used (missing or undecodable file, empty
      # caption): "error" | "skip". Sources of at most validate_max_records
      # records (and, with "error", every folder: source) are read in full
      # before training: "error" stops the run listing all of them (exit
      # 2); "skip" trains with them as zero rows. During training a record
      # that fails is always a zero row (N unchanged), reported only at the
      # end, in <workdir>/private_bad_records.json (private data).
      on_bad_record="error",
      validate_max_records=100_000,  # start-up validation size threshold.
  ))
  c.privacy = privacy_block()
  c.train = train_block()
  c.mesh = mesh_block()
  c.audit = audit_block()
  # Evaluators (dpjax/evaluate), big_vision's shape: name -> {type (a key
  # of dpjax.evaluate.TYPES), log_steps (> 0: also every that many steps;
  # 0: at the end only; < 0: off), prefix of its metrics (default: the
  # name), then the type's own fields}; each config names its recipe's
  # functions and data the evaluators read. Empty: none.
  c.evals = ml_collections.ConfigDict()
  return c


def privacy_block() -> ml_collections.ConfigDict:
  """DP-SGD settings (read by dpjax/train/privacy_settings.py:from_config;
  the mechanism and its knobs by dpjax/privacy/mechanisms/)."""
  return ml_collections.ConfigDict(dict(
      # Knobs of mechanisms not declared below, at their defaults (each is
      # documented in its mechanism's file under dpjax/privacy/mechanisms/).
      privacy_mechanisms.knob_defaults(),
      enabled=True,  # False: non-private training (baselines); spends nothing.
      l2_clip_norm=1.0,  # C: each unit's gradient is clipped to this L2 norm.
      clipping="clip",  # "clip": min(1, C/|g|); "normalize": C/(|g|+gamma).
      normalize_gamma=0.01,  # gamma of automatic (normalising) clipping.
      noise_multiplier=-1.0,  # sigma; < 0 means calibrate to target_epsilon.
      target_epsilon=8.0,  # budget: sigma is calibrated to it; training
                           # stops before the ledger would exceed it.
      delta=-1.0,  # < 0 means N^-1.1 (N = private examples or users):
                   # strictly below 1/N, which would allow publishing one
                   # record outright. Paper presets set their paper's delta.
      accountant="pld",  # "pld" or "rdp" (dp_accounting).
      sampling="poisson",  # Poisson subsampling (the accounted mechanism).
      # The DP mechanism (dpjax/privacy/mechanisms/<name>.py: its sampler,
      # noise and accounting). "dpsgd": fresh noise each step, Poisson
      # sampling. "bandmf": noise correlated across `bands` steps, with
      # b-cyclic Poisson sampling (each example in its own secret uniform
      # partition; step t samples partition t mod b at rate q*b) and its
      # accounting. "blt": noise correlated across all steps through
      # `blt_buffers` buffers, the same b-cyclic sampler with b =
      # `min_separation`, accounted as one Gaussian mechanism per phase (no
      # amplification by sampling). "truncated_poisson": DP-SGD reading
      # exactly `max_batch_size` rows every step (0: a size that
      # truncates with probability 1e-6), accounted with the truncation
      # (PLD only). A knob of another mechanism must keep its default.
      mechanism="dpsgd",
      bands=1,  # BandMF's b: noise correlated over b steps (1: DP-SGD).
      min_separation=1,  # BLT's b: an example's steps are >= b apart
                         # (batch = q*N; q*b = 1 samples a partition whole).
      blt_buffers=4,  # BLT's noise buffers, each the size of the params.
      # TAN simulation (DP-Cap, Sander et al. 2023): > 0 means "simulate the
      # run at this reference batch": sigma is calibrated for the reference
      # batch and scaled by batch_size / reference. Not an epsilon run.
      tan_reference_batch_size=0,
      # Per-example clipping: "auto" (ghost norms + book-keeping where a
      # layer allows, vmap elsewhere; at least as fast as vmap and never
      # more memory in benchmarks/peers.py) | "ghost" | "vmap".
      method="auto",
      # The two secrets the guarantee rests on. -1 (default): OS entropy
      # filling the whole PRNG key, broadcast from process 0, kept in the
      # resumable checkpoint (never in export/, never logged). Independent of
      # `config.seed` (init, public data) and of each other. A seed others
      # know voids the guarantee (noise: they can subtract it; sampling:
      # they know which examples each step used, so there is no
      # amplification by subsampling): set one only for tests and
      # reproducible experiments; the run then warns and results.json says
      # `secret_randomness: false`.
      noise_seed=-1,  # the Gaussian noise.
      # Poisson batch selection and every per-example random choice on
      # private data (augmentation, MAE masks, DP-FedEmb user grouping).
      sampling_seed=-1,
  ))


def train_block() -> ml_collections.ConfigDict:
  """Optimisation and loop settings."""
  return ml_collections.ConfigDict(dict(
      steps=100,  # logical DP steps (T).
      batch_size=256,  # EXPECTED logical batch q*N (Poisson: realised varies).
      microbatch_size=64,  # global physical batch per accumulation call.
      inner_microbatch=0,  # > 0: lax.scan inside a device call (memory).
      optimizer="adamw",  # "adamw" | "sgd".
      learning_rate=1e-3,  # peak learning rate.
      b1=0.9,
      b2=0.95,
      weight_decay=0.005,  # decoupled, on all params (costs no privacy).
      momentum=0.0,  # for sgd.
      warmup_steps=0,  # linear warm-up.
      decay_steps=0,  # cosine horizon; 0 means `steps` (can exceed steps:
                      # DP-Cap truncates its cosine at 5,708 of 10,000).
      log_every=10,  # steps between log lines (loss, epsilon, examples/s).
      # True: the progress bar also shows the private/ training loss
      # (computed on private data, not DP). Default: public values only.
      progress_private=False,
      checkpoint_every=50,  # steps between Orbax checkpoints.
      keep_checkpoints=2,
      dtype="float32",  # activation dtype: "float32" | "bfloat16".
      num_workers=0,  # Grain worker processes for decoding/augmentation.
      # K > 1: each sampled example is K augmented copies, its gradient the
      # mean over them, clipped once (privacy unit unchanged; private
      # example-level phases; K x the compute and activation memory).
      augmult=1,
      # > 0: also keep an EMA of the params (post-processing, no privacy
      # cost), evaluated as "eval_ema/..." and exported to export/ema_params.
      ema_decay=0.0,
      ema_warmup=True,  # decay min(ema_decay, (1+t)/(10+t)) at update t.
  ))


def mesh_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=-1,  # devices on the data-parallel axis; -1 = all that remain.
      fsdp=1,  # devices over which parameters are sharded (FSDP-style).
  ))


# The :paper presets' memory plan (docs/paper_scale.md): ghost / book-
# keeping clipping ("auto": the same clipped sum as "vmap", no per-example
# gradient in memory), parameters and optimizer state sharded over 8
# devices, and a lax.scan over chunks of `inner` examples per device. It
# fits 8 simulated CPU devices of a 24 GiB host (`dpjax.plan --mesh=cpu:8`)
# and leaves most of a TPU v5p's / H100's HBM free; on a pod, a larger
# train.inner_microbatch (0: none) trades that memory for fewer scan steps.
PAPER_FSDP = 8


def paper_memory(config: ml_collections.ConfigDict, inner: int) -> None:
  """Sets the memory plan above on a :paper config (in place)."""
  config.privacy.method = "auto"
  config.train.inner_microbatch = inner
  config.mesh.fsdp = PAPER_FSDP


def audit_block() -> ml_collections.ConfigDict:
  """Input-space canaries audited at the end of the run (dpjax/train/canaries.py)."""
  return ml_collections.ConfigDict(dict(
      num_canaries=0,  # m > 0: the recipe makes m canaries, each inserted
                       # into the private data independently w.p. 1/2.
      seed=0,  # which canaries exist and which are inserted.
      confidence=0.95,  # of the empirical epsilon lower bound.
      # delta of the bound, and of the accountant epsilon it is compared to.
      # The one-run bound is vacuous when m * delta is not small, so it is
      # not the run's 1/N.
      delta=1e-6,
      # Guess counts fixed before training, as fractions of m guessed "in"
      # (lowest loss) and as many "out"; the best is kept (Bonferroni).
      guess_fractions=(0.02, 0.05, 0.1, 0.25),
  ))


# `:paper,smoke`: one DP step of the paper's model at full size.
SMOKE_TRAIN = dict(steps=1, batch_size=4, microbatch_size=2, warmup_steps=0,
                   log_every=1, checkpoint_every=1, num_workers=0,
                   inner_microbatch=0)


def paper_smoke(config: ml_collections.ConfigDict,
                tiny: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a `:paper` config) as a smoke run: same model, image size,
  vocabulary size, clipping method and dtype; one step of an expected batch
  of 4 in microbatches of 2 on one device (mesh.fsdp 1, no inner scan);
  every real data source (and a missing vocabulary file) replaced by
  `tiny`'s embedded one at the same field (dpjax/train/stand_in.py).

  The caller shrinks N and the evaluations first: references (delta = 1/N,
  lr = blr * B / 256) are resolved here, at the smoke values.
  """
  config.train.update(SMOKE_TRAIN)
  config.mesh.fsdp = 1
  out, _ = stand_in.stand_in_data(config, tiny)
  return out
