"""DP-FedEmb recipe (Xu et al., CVPR 2023): user-level DP image embeddings.

Glue only. Params are {"backbone": Embedder params, "head": public head}.
Phases (config.phases):
  * "public": non-private pre-training of backbone + a head over the PUBLIC
    identities (per-example Poisson batches; spends no budget).
  * "dp": DP-FedAvg with partially local variables over the PRIVATE users.
    Each round Poisson-samples USERS (each independently w.p. q) and hashes
    each sampled user into one of G = ceil(train.batch_size / k) virtual
    clients of at most fedemb.client_capacity users (keyed by the secret
    sampling seed, the round and the user: `data.clients`, whose docstring
    has the sensitivity argument); each virtual client initialises a fresh
    local head (key from (seed, round, client)), trains it alone for the
    first fedemb.reconst_steps local steps, then backbone + local head on
    its users' examples (client SGD, head lr x head_lr_scale; optionally a
    cosine head on s * z / |z|, fedemb.local_logit_scale;
    `privacy.user_level.local_training`, vmapped over clients), and returns
    the BACKBONE delta theta_start - theta_end clipped to C (k = 1) or C/2
    (k >= 2: one user can move a mixed client's clipped delta by twice the
    client clip, so C/2 keeps the per-user sensitivity at C). The local
    head is dropped inside the computation: never returned, summed or
    noised. The loop adds N(0, (sigma C)^2) once, divides by the expected
    number of USERS q*N and applies server SGD (train.momentum) to the
    backbone; the public head is frozen in this phase (optax.set_to_zero:
    the noise the loop draws for its zero "gradient" is discarded).
    Accounting: Poisson at rate q = expected users / N users per round, one
    ledger event per ROUND; the default delta is computed from N USERS.
  With privacy.enabled=False the "dp" phase runs the same federated
  algorithm without clipping or noise (the non-DP baseline).
Evaluation: exact all-pairs recall at FAR 1e-3 / 0.1 and recall@1 of
L2-normalised embeddings of held-out identities (evaluate.retrieval), from
users never trained on: synthetic sources use disjoint identity ranges; real
user-keyed sources hold out whole users by a public hash of the user id
(data.heldout_user_fraction, `data.users.is_heldout_user`): the private
source drops them and the evaluation keeps only them. Held-out users of the
private source are still private people: unless data.eval_public names a
public evaluation source, the evaluation is "private_eval/" (not DP, never
in export/; `eval_is_public`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import evaluate
from dpjax.data import clients
from dpjax.data import pipeline
from dpjax.data import synthetic
from dpjax.data import transforms as transforms_lib
from dpjax.data import users as users_lib
from dpjax import errors
from dpjax.errors import ConfigError
from dpjax.evaluate import linear_probe
from dpjax.models import embedder
from dpjax.privacy import clipping
from dpjax.privacy import user_level
from dpjax.recipes import dpfedemb_data
from dpjax.train import task as task_lib

PHASES = ("public", "dp")


def local_labels(labels: jax.Array, mask: jax.Array,
                 num_classes: int) -> jax.Array:
  """Maps one client's labels [E] to ranks among its distinct real labels.

  A client's fresh head has `num_classes` outputs; label l becomes the number
  of distinct real labels < l (clipped to num_classes - 1). O(E^2).
  """
  real = mask > 0
  same = labels[:, None] == labels[None, :]
  earlier = jnp.tril(jnp.ones_like(same), -1)
  first = real & ~jnp.any(same & earlier & real[None, :], axis=1)
  rank = jnp.sum(first[None, :] & (labels[None, :] < labels[:, None]), 1)
  return jnp.minimum(rank, num_classes - 1).astype(jnp.int32)


def imprinted_kernel(z: jax.Array, labels: jax.Array, mask: jax.Array,
                     fallback: jax.Array) -> jax.Array:
  """Local head kernel by weight imprinting, from one client's own data.

  Args:
    z: [E, D] embeddings of the client's examples (current backbone).
    labels: int [E] local labels in [0, C).
    mask: [E] 1 for real examples, 0 for padding (ignored).
    fallback: [D, C] kernel (e.g. Glorot) for classes with no real example.

  Returns:
    [D, C]: column c = the unit-normalised mean of the unit-normalised
    embeddings of class c, so a cosine head starts at the class prototypes.
  """
  num_classes = fallback.shape[1]
  real = mask > 0
  onehot = jax.nn.one_hot(labels, num_classes) * real[:, None]
  z = jnp.where(real[:, None], embedder.l2_normalize(z.astype(jnp.float32)),
                0.0)  # padding rows -> 0, even if non-finite.
  sums = onehot.T @ z  # [C, D]
  present = jnp.sum(onehot, axis=0) > 0
  return jnp.where(present[None, :], embedder.l2_normalize(sums).T,
                   fallback)


def eval_is_public(config: ml_collections.ConfigDict) -> bool:
  """config.data.eval_public: whether the evaluation source is public data
  (its metrics "eval/", exported) rather than derived from the private
  source ("private_eval/": computed on private users without DP). Refused
  (ConfigError) for held-out users of the private source."""
  d = config.data
  public = bool(d.get("eval_public", False))
  derived = d.heldout_user_fraction > 0 or (
      d.eval_source == d.source and not d.source.startswith("synthetic:"))
  if public and derived:
    raise errors.config_error(
        "data.eval_public", True, f"the evaluation reads users of the "
        f"private source {d.source!r} (held out of training, but private "
        "data): set it False (its metrics are then private_eval/), or name "
        "a public data.eval_source")
  return public


def _server_optimizer(config) -> optax.GradientTransformation:
  """Server SGD(+momentum) on the backbone; the public head is frozen.

  The loop divides the noisy delta sum by expected USERS; the paper averages
  over virtual clients, so the rate is scaled by k to keep
  train.learning_rate the paper's server_lr.
  """
  t, k = config.train, config.fedemb.users_per_client
  sgd = optax.sgd(t.learning_rate * k, momentum=t.momentum or None)
  return optax.multi_transform({"backbone": sgd, "head": optax.set_to_zero()},
                               {"backbone": "backbone", "head": "head"})


def build(config: ml_collections.ConfigDict) -> task_lib.Task:
  """The DP-FedEmb task for `train.loop.run`."""
  d, f, p = config.data, config.fedemb, config.public
  phases = [s.strip() for s in config.phases.split(",") if s.strip()]
  if not phases or any(s not in PHASES for s in phases):
    raise ConfigError(f"config.phases={config.phases!r}: use a comma list of "
                      f"{PHASES} (in that order)")
  mcfg = embedder.embedder_config(config.model.variant)
  if config.model.embed_dim:
    mcfg["embed_dim"] = config.model.embed_dim
  if config.model.features:
    mcfg["features"] = tuple(config.model.features)
  backbone = embedder.Embedder(**mcfg)
  public_head = embedder.Head(d.public_num_classes or d.public_num_identities)
  local_head = embedder.Head(f.local_classes)
  image = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32)
  emb = jnp.zeros((1, mcfg["embed_dim"]), jnp.float32)

  def init_params(rng):
    r1, r2 = jax.random.split(rng)
    return {"backbone": backbone.init(r1, image)["params"],
            "head": public_head.init(r2, emb)["params"]}

  def embed(bparams, images):
    return backbone.apply({"params": bparams}, images)

  def ce(logits, label):
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)

  def public_loss(params, example):
    z = embed(params["backbone"], example["image"][None])
    logits = public_head.apply({"params": params["head"]}, z)
    return ce(logits, example["label"][None])[0]

  def local_loss(bparams, hparams, example):
    z = embed(bparams, example["image"][None])
    if f.local_logit_scale:  # cosine-softmax local head on unit embeddings.
      z = f.local_logit_scale * embedder.l2_normalize(z)
    logits = local_head.apply({"params": hparams}, z)
    return ce(logits, example["label"][None])[0]

  out = []
  if "public" in phases:
    src = dpfedemb_data.public_source(config)
    ts = dpfedemb_data.transforms(
        config, dpfedemb_data.label_field(d.public_source))
    out.append(task_lib.Phase(
        name="public", private=False, source=src, transforms=ts,
        loss_fn=public_loss, steps=p.steps, batch_size=p.batch_size,
        optimizer=optax.adam(p.learning_rate),
        # Its own microbatch (public.microbatch_size), else the loop's.
        make_batches=lambda source, **kw: iter(pipeline.PoissonBatches(
            source, ts, num_examples=len(source),
            **{**kw, "global_microbatch": p.microbatch_size}))))
  if "dp" in phases:
    out.append(_dp_phase(config, local_loss, local_head, mcfg["embed_dim"],
                         lambda params, x: embed(params["backbone"], x)))

  context = evaluate.Context(
      "dpfedemb", fns={"embed": lambda params, x: embed(params["backbone"], x)},
      data={"test": lambda: dpfedemb_data.eval_arrays(config)},
      private_data=() if eval_is_public(config) else ("test",))
  return task_lib.Task(init_params=init_params, phases=out,
                       evaluators=evaluate.from_config(config.evals, context))


def _dp_phase(config, local_loss, local_head, embed_dim,
              embed_fn) -> task_lib.Phase:
  """The user-level phase: virtual clients, clipped backbone deltas."""
  d, f, t = config.data, config.fedemb, config.train
  src = dpfedemb_data.private_source(config)
  ts = dpfedemb_data.transforms(config, dpfedemb_data.label_field(d.source))
  k = f.users_per_client
  if t.batch_size > src.num_users:
    raise ConfigError(f"config.train.batch_size={t.batch_size} (expected "
                      f"users per round) exceeds the {src.num_users} users")
  # G and K from public config only (never from N or the data): see the
  # sensitivity argument in users_lib.
  num_clients = clients.num_virtual_clients(t.batch_size, k)
  capacity = clients.client_capacity(f.client_capacity, k)

  def init_head(rng):
    return local_head.init(rng, jnp.zeros((1, embed_dim)))["params"]

  def imprint_head(rng, bparams, example, mask):
    z = embed_fn({"backbone": bparams}, example["image"])
    kernel = imprinted_kernel(z, example["label"], mask,
                              init_head(rng)["dense"]["kernel"])
    return {"dense": {"kernel": kernel}}

  if f.head_init not in ("glorot", "imprint"):
    raise ConfigError(f"config.fedemb.head_init={f.head_init!r}: use "
                      "'glorot' (the paper's) or 'imprint'")

  local_train = user_level.local_training(
      local_loss, imprint_head if f.head_init == "imprint" else init_head,
      shared_optimizer=optax.sgd(f.client_lr,
                                 momentum=f.client_momentum or None),
      local_optimizer=optax.sgd(f.client_lr * f.head_lr_scale,
                                momentum=f.client_momentum or None),
      batch_size=f.client_batch_size, epochs=f.client_epochs,
      reconst_steps=f.reconst_steps, init_from_data=f.head_init == "imprint")
  private = bool(config.privacy.enabled)
  # The per-user bound C is the sum's sensitivity (units clipped to C/2
  # when k >= 2): the loop's noise reads it from the returned BoundedSum.
  core = user_level.clipped_delta_sum(
      local_train, config.privacy.l2_clip_norm if private else None,
      users_per_unit=k, unit_batch=f.unit_batch)

  def clipped_sum_fn(params, batch, mask):
    """Sum over real virtual clients of clipped backbone deltas; aux counts
    USERS (loss/norm statistics weighted by users per client)."""
    labels = jax.vmap(functools.partial(
        local_labels, num_classes=f.local_classes))(
            batch["label"], batch["example_mask"])
    units = {"example": {"image": batch["image"], "label": labels},
             "mask": batch["example_mask"], "rng": batch["unit_rng"]}
    delta_sum, aux = core(params["backbone"], units, mask,
                          weights=batch["num_users"])
    zeros = jax.tree.map(jnp.zeros_like, params["head"])
    return {"backbone": delta_sum, "head": zeros}, aux

  if private:  # The bounded backbone sum and an exact zero head: same bound.
    clipped_sum_fn = clipping.BoundedSum(clipped_sum_fn, core.l2_sensitivity,
                                         core.unit)

  label_field = dpfedemb_data.label_field(d.source)
  # The loop passes the source it runs (audit canary users appended) and q.
  make_batches = lambda source, **kw: clients.virtual_client_batches(
      source, ts, users_per_client=k,
      max_examples_per_user=f.max_examples_per_user,
      num_clients=num_clients, client_capacity=capacity, **kw)
  return task_lib.Phase(
      name="dp" if private else "federated", private=private, source=src,
      transforms=ts, loss_fn=lambda params, example: local_loss(
          params["backbone"], init_head(jax.random.PRNGKey(0)), example),
      steps=t.steps, batch_size=t.batch_size,
      optimizer=_server_optimizer(config), clipped_sum_fn=clipped_sum_fn,
      num_examples=src.num_users, make_batches=make_batches,
      canaries=lambda m, seed: canary_users(
          m, seed, d.image_size, f.max_examples_per_user, label_field),
      append_canaries=users_lib.AppendedUsers,
      canary_scores=lambda params, users: canary_scores(
          embed_fn, params, users, ts, label_field))


_CANARY_LABEL = 1 << 30  # Canary users' labels: above any real identity.
_CANARY_IDENTITY = 1 << 24  # First synthetic glyph identity of canaries.


def canary_users(num: int, seed: int, image_size: int, num_images: int,
                 label_field: str) -> list[dict]:
  """User-level audit canaries: ``num`` mislabelled users.

  Canary user i owns ``num_images`` images of TWO different synthetic glyph
  identities (half each; identities far from any data split's) under ONE
  label of its own. Training on it pulls the two identities' embeddings
  together, which nothing else does (`canary_scores`).
  """
  half = num_images - num_images // 2
  glyphs = synthetic.Identities(2 * num, half, image_size, seed=seed,
                                split="canary",
                                first_identity=_CANARY_IDENTITY)
  out = []
  for i in range(num):
    first = [glyphs[2 * i * half + j]["image"] for j in range(num_images // 2)]
    second = [glyphs[(2 * i + 1) * half + j]["image"]
              for j in range(num_images - num_images // 2)]
    out.append({"images": first + second, label_field: _CANARY_LABEL + i})
  return out


def canary_scores(embed_fn, params, users: list[dict], transforms,
                  label_field: str) -> np.ndarray:
  """float[m]: how much closer a canary user's two identities embed than
  two identities of different canaries: mean cosine similarity of user i's
  first-identity images to its second-identity images, minus the mean over
  users j != i of that to user j's (robust to a globally contracting
  embedding). High = trained on."""
  images = np.stack([
      transforms_lib.apply(transforms, {"image": im, label_field: 0},
                           np.random.default_rng(0))["image"]
      for user in users for im in user["images"]])
  z = linear_probe.batched_apply(embed_fn, params, images, 256)
  z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  e = len(users[0]["images"])
  z = z.reshape(len(users), e, -1)
  a, b = z[:, :e // 2].mean(1), z[:, e // 2:].mean(1)
  sim = a @ b.T  # [m, m]: mean cosine of i's first to j's second identity.
  m = len(users)
  others = (sim.sum(1) - np.diag(sim)) / max(m - 1, 1)
  return np.diag(sim) - others
