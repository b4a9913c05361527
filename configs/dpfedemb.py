r"""DP-FedEmb: user-level DP image embeddings (Xu et al., CVPR 2023).

Paper preset (default): the EMNIST-62 setting. Users are writers (3,400 in
federated EMNIST); train on classes 0-35, evaluate open-set on the unseen
classes 36-61 of HELD-OUT writers: 10% of the writers, chosen by a public
hash of the writer id (data.heldout_user_fraction), are never trained on
and are the only ones evaluated (FEMNIST's test split has the same writers
as train, so it is not held-out data for user-level DP). Held-out writers
are still private data: their metrics are private_eval/* (not DP, never
in <workdir>/export/) unless data.eval_public names a public source. LeNet
backbone -> 128-d embedding; 200 rounds of 256 expected users (Poisson)
hashed into 32 virtual clients of ~8 writers (at most 16), client SGD batch
16, 1 epoch, fresh local head; server SGD lr 0.1 momentum 0.9 [verify the
paper's client/server lr]. TFDS `emnist` has NO writer ids: export federated
EMNIST (e.g. TFF's `emnist`) as a folder ({"file", "writer_id", "label"}
lines in captions.jsonl) or parquet (image bytes, writer_id, label) and
convert it user-keyed (keep the default exact dedup; near dedup would merge
different writers' glyphs):
  python -m dpjax.prepare --input=/data/femnist --format=folder \
      --caption_key= --user_key=writer_id --label_key=label \
      --output=/data/femnist-ar
data.source and data.eval_source read the same directory.

Sensitivity: privacy.l2_clip_norm is C per USER. Each round samples users
independently and hashes each sampled user into one of G = ceil(expected
users / k) virtual clients (G from this config, never from the data), so
adding or removing one user changes only its own client's input set
(dpjax/data/clients.py has the argument). Removing one user can move
a mixed client's clipped delta by twice its clip norm, so clients are
clipped to C/2 (C=2 here gives the paper's client clip 1.0) and the noise
sigma*C is calibrated to the true per-user sensitivity (twice the paper's
absolute noise at sigma = 0.62).

  python -m dpjax.main --config=configs/dpfedemb.py --workdir=runs/fedemb
  python -m dpjax.main --config=configs/dpfedemb.py:tiny --workdir=runs/fe

`:tiny` runs on a 2-core CPU in minutes on the embedded synthetic
identities (one identity per user, a DigiFace stand-in) with public
pre-training on disjoint public identities, epsilon 4 at delta N^-1.1
(N = private users; dpjax's default).
Baselines: --config.privacy.enabled=False (same federated algorithm, no
clipping or noise) and --config.phases=public (the public init alone).
Measured (:tiny, 20 rounds of 320 expected users, recall@FAR0.1 /
recall@1, one run each): public init 0.457 / 0.269; DP eps 4.0 at delta
1/N 0.500 / 0.383 (users hashed into 40 clients of <= 16; 0.498 / 0.390
with the earlier fixed groups of 8, whose sensitivity claim did not hold),
0.513 / 0.339 and 0.458 / 0.327 (two runs) at delta N^-1.1; non-DP 0.539 /
0.416 (0.533 / 0.414 with fixed groups of 8).

`:paper,smoke` runs the paper's LeNet (28x28, 128-d) for ONE public step
and ONE user-level round on the embedded identities (64 users of 6 images,
4 expected users per round: one virtual client of up to 16 users x 64 rows
in a microbatch of 2 clients, the paper's local training), then recall on
48 held-out images:

  python -m dpjax.main --config=configs/dpfedemb.py:paper,smoke \
      --workdir=runs/s

Meshes: a round's G = 256 / 8 = 32 virtual clients are its unit of
parallel work (one client's local training runs on one device), so the
paper preset is planned on 32 chips (`--mesh=v5p-64`). On 64 chips set
--config.train.microbatch_size=64: each chip then holds one client and half
of them are padding (mask 0, no privacy effect), i.e. twice the chip-hours
for the same wall time.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the DP-FedEmb config; `arg` = "paper" (default) | "tiny" |
  "paper,smoke"."""
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config("dpfedemb")  # init_checkpoint: e.g. a finished
                                      # public-only run.
  c.phases = "public,dp"  # "public" and/or "dp" (user-level DP-FedAvg).

  c.model = ml_collections.ConfigDict(dict(
      variant="lenet",  # dpjax.models.embedder.embedder_config variant.
      embed_dim=0,  # 0: the variant's embedding width.
      features=(),  # CNN channels; (): the variant's.
  ))
  c.data.update(dict(
      # Private user-partitioned source: "synthetic:identities" (one identity
      # per user) | "tfds:<name>" | "arrayrecord:<glob>" keyed by user_key.
      source="arrayrecord:/data/femnist-ar",
      data_dir="",  # TFDS data_dir ("" = TFDS default).
      split="train",
      image_key="image",  # record field names of real sources.
      label_key="label",
      user_key="user",  # user (writer) id field of real sources.
      train_label_range=(0, 36),  # keep labels in [lo, hi); () keeps all.
      image_size=28,
      num_users=3400,  # synthetic: users (= identities); real: from data.
      images_per_identity=0,  # synthetic only.
      # Public pre-training data (disjoint from the private users). The
      # paper's EMNIST public data is [verify]; MNIST is our stand-in.
      public_source="tfds:mnist",
      public_split="train",
      public_num_identities=0,  # synthetic: public identities.
      public_num_classes=10,  # public head width (0 = public identities).
      # Held-out open-set evaluation data. Real user-keyed sources: only
      # users (writers) with is_heldout_user(id, heldout_user_fraction), a
      # public hash of the id, which the private source drops; so the
      # evaluation is on whole writers never trained on, here read from the
      # train files (FEMNIST's test split shares train's writers).
      eval_source="arrayrecord:/data/femnist-ar",
      eval_split="train",
      heldout_user_fraction=0.1,  # writers held out of training for eval.
      # Whether eval_source is PUBLIC data (its metrics eval/*, exported).
      # False: it derives from the private source (held-out writers are
      # private people), so its metrics are private_eval/* (not DP, never
      # in export/). True is refused with heldout_user_fraction > 0.
      eval_public=False,
      eval_num_identities=0,  # synthetic: held-out identities.
      eval_num_examples=20_000,  # cap on eval images (all-pairs metrics).
      eval_label_range=(36, 62),  # EMNIST: unseen classes 36-61.
  ))
  c.public = ml_collections.ConfigDict(dict(
      steps=2000,  # non-private pre-training steps (Adam).
      batch_size=256,  # expected (Poisson) public batch.
      microbatch_size=256,  # examples per accumulation call.
      learning_rate=1e-3,
  ))
  c.fedemb = ml_collections.ConfigDict(dict(
      users_per_client=8,  # k users per virtual client (paper:
                           # dynamic_clients); client clip is C/2 if k > 1.
      max_examples_per_user=64,  # E: per-user cap (uniform subset).
      # K: most users one virtual client holds (a jit shape: K * E example
      # rows per client; k = 1 ignores it). Users per client are ~Poisson(k)
      # (G = ceil(train.batch_size / k) clients); the overflow keeps a keyed
      # random K of them. 0 = 2k = 16 here: P(Poisson(8) > 16) = 0.4% per
      # client (11% of rounds overflow somewhere), ~0.2 of 256 expected
      # users dropped per round.
      client_capacity=0,
      client_batch_size=16,
      client_epochs=1,
      client_lr=0.01,  # client SGD learning rate (backbone).
      client_momentum=0.9,
      head_lr_scale=100.0,  # local head lr = head_lr_scale * client_lr.
      local_logit_scale=0.0,  # > 0: the local head sees s * z / |z|
                              # (0: the raw embedding z).
      # Fresh local head: "glorot" (the paper's) or "imprint" (rows = the
      # client's normalised class-mean embeddings; a useful head at step 0).
      head_init="glorot",
      reconst_steps=0,  # first local steps train the fresh head only
                        # (the paper's reconst_iters).
      local_classes=36,  # outputs of the fresh local head (>= distinct
                         # labels of one virtual client; more collapse).
      unit_batch=0,  # 0: vmap over all clients of a chunk; b > 0: lax.map
                     # over groups of b vmapped clients (CPU: faster).
  ))
  c.privacy.update(dict(
      l2_clip_norm=2.0,  # C per USER; virtual clients are clipped to C/2.
      noise_multiplier=0.62,  # the paper's sigma (see the module doc).
      target_epsilon=50.0,  # stop threshold only (sigma is given).
      # delta: dpjax's default N^-1.1 (N = private users); the paper's delta
      # is not in the sources we read (its code's client ids suggest
      # 1/6,800) [verify].
      delta=-1.0,
      accountant="rdp"))
  # The DP phase: train.steps = rounds, batch_size = EXPECTED users per
  # round (Poisson, q = batch_size / users), microbatch_size = virtual
  # clients per accumulation call, learning_rate = server lr (on the mean
  # virtual-client delta), optimizer: server SGD with momentum.
  c.train.update(
      steps=200, batch_size=256, microbatch_size=32, optimizer="sgd",
      learning_rate=0.1, momentum=0.9, weight_decay=0.0,
      checkpoint_every=20, log_every=5)
  # Evaluators (configs/common.py:base_config). The recipe's function:
  # embed; its data: test (image, identity of the held-out users).
  c.evals = ml_collections.ConfigDict(dict(
      # Exact all-pairs recall at the false accept rates `fars` and
      # recall@1; batch_size images per embedding call.
      retrieval=dict(type="retrieval", log_steps=0, fars=(1e-3, 0.1),
                     batch_size=256),
  ))

  if arg.preset == "tiny":
    c.model.update(variant="tiny", embed_dim=32, features=(8, 16))
    c.data.update(dict(
        source="synthetic:identities", train_label_range=(), image_size=16,
        num_users=8000, images_per_identity=6,
        public_source="synthetic:identities", public_split="public",
        public_num_identities=200, public_num_classes=0,
        eval_source="synthetic:identities", eval_split="eval",
        eval_num_identities=150, eval_num_examples=900,
        eval_label_range=(),
        # Held out by construction: eval identities are a range disjoint
        # from the private and public ones (first_identity offsets); they
        # are synthetic, so public.
        heldout_user_fraction=0.0, eval_public=True))
    c.public.update(steps=100, batch_size=128, microbatch_size=128,
                    learning_rate=3e-3)
    # Local: 3 epochs of 3 steps on the client's 48 images; the fresh
    # cosine head is imprinted (rows = the client's class-mean embeddings)
    # so every step trains a useful head and the backbone (with a random
    # head the backbone's first steps chase noise).
    c.fedemb.update(dict(
        users_per_client=8, max_examples_per_user=6, client_batch_size=16,
        client_epochs=3, client_lr=0.05, client_momentum=0.0,
        head_init="imprint", head_lr_scale=2.0, local_logit_scale=10.0,
        # local_classes=8: a client's ranks >= 8 share the last output
        # (16 measured no better: recall@1 0.348 vs 0.383 at delta 1/N).
        reconst_steps=0, local_classes=8, unit_batch=4,
        # 0 = 2k = 16 users (96 example rows) per client; 40 clients of
        # ~Poisson(8) users: P(> 16) = 0.4% per client (14% of rounds
        # overflow somewhere), ~0.25 of 320 expected users dropped a round.
        client_capacity=0))
    c.privacy.update(dict(
        l2_clip_norm=1.0, noise_multiplier=-1.0,  # calibrated to epsilon 4.
        target_epsilon=4.0, accountant="pld"))
    # Server: SGD, lr 1.0 x k = 8 on the mean virtual-client delta (server
    # lr 0.0625 / 0.25 / 0.5 / 1.0 gave non-DP recall@1 0.28 / 0.33 / 0.37 /
    # 0.41 from the init's 0.27: 20 rounds need large server steps).
    c.train.update(dict(steps=20, batch_size=320, microbatch_size=40,
                        learning_rate=1.0, momentum=0.0,
                        checkpoint_every=10, log_every=5))
  elif arg.preset != "paper":
    raise ValueError(f"configs/dpfedemb.py:{arg.preset}: unknown preset; "
                     "use :paper or :tiny")
  if arg.smoke:
    if arg.preset != "paper":
      raise ValueError(f"configs/dpfedemb.py:{arg.preset},smoke: smoke "
                       "modifies :paper only")
    # Synthetic identities: every label is a user; eval identities are
    # disjoint by construction (no label ranges, no held-out hash).
    c.data.update(dict(
        num_users=64, train_label_range=(), eval_label_range=(),
        heldout_user_fraction=0.0, eval_num_examples=48,
        eval_public=True,  # the stand-in's synthetic identities.
        # The paper's 10-way public head: 10 public identities.
        public_num_identities=10))
    c.public.update(dict(steps=1, batch_size=4, microbatch_size=2))
    c = common.paper_smoke(c, get_config("tiny"))
  return c
