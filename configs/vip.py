r"""ViP: DP masked-autoencoder pretraining (Yu et al., ICML 2024).

Two phases in one run (`dpjax/recipes/vip.py`):
  1. "pretrain": NON-private MAE on synthetic images (Shaders21k in the
     paper; `synthetic:textures`, a procedural stand-in, by default). Public
     data: it spends no privacy budget and the ledger records nothing.
  2. "dp": DP-SGD MAE on the private images (Poisson sampling, per-example
     clipping at C=0.1, one Gaussian draw per step), accounted in the ledger.

Paper preset (default): ViT-B/16 encoder + 512-d 4-block decoder, mask ratio
0.75, C=0.1, B=98,304, sigma=0.48, T=6,000, AdamW (0.9, 0.95) wd 0.005,
lr = blr * B / 256, 1,000 warm-up steps then cosine, delta = 1/(2N) (RDP:
epsilon 7.996 on LAION-233M), linear probe with the MAE protocol.

  python -m dpjax.main --config=configs/vip.py --workdir=runs/vip
  python -m dpjax.main --config=configs/vip.py:tiny --workdir=runs/vip_tiny

Phase 2 only, from a phase-1 run (a FRESH workdir; init_checkpoint is read
once, at the start):
  ... --config.phases=dp --config.init_checkpoint=runs/vip_syn
Phase 1 only (a Syn-ViP checkpoint): --config.phases=pretrain.
Rerunning a "pretrain" workdir with --config.phases=pretrain,dp resumes into
phase 2. DP-MAE from random init: --config.pretrain.steps=0.

`:tiny` runs both phases on the embedded procedural data on a CPU in about
five minutes (32x32 images, patch 8, a 64-d x 3 encoder).

`:paper,smoke` runs the paper's model at full size (ViT-B/16 at 224x224 +
the 512-d 4-block decoder, auto (ghost) clipping at C=0.1, float32) for ONE
step of each phase on the embedded data (N=64 per phase, expected batch 4,
microbatches of 2, one device), then the held-out MAE loss on 8 images:

  python -m dpjax.main --config=configs/vip.py:paper,smoke --workdir=runs/s
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ViP config; `arg` = "paper" (default) | "tiny" |
  "paper,smoke"."""
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config("vip")  # init_checkpoint: a phase-1 (Syn-ViP) run.
  # Phases to build, in order: "pretrain,dp" | "pretrain" | "dp".
  # pretrain.steps=0 also drops phase 1.
  c.phases = "pretrain,dp"

  c.model = ml_collections.ConfigDict(dict(
      variant="B/16",  # encoder: dpjax.models.vit.vit_config variant.
      width=0,  # encoder overrides of the variant (0 = the variant's).
      depth=0,
      num_heads=0,
      mlp_dim=0,
      patch_size=0,
      # ViP's released code makes the sin-cos position embedding trainable.
      pos_embedding="learn_sincos",  # "sincos2d" | "learn" | "learn_sincos".
      decoder_width=512,  # mae_vit_base_dec512d4b: 512-d, 4 blocks, 16 heads.
      decoder_depth=4,
      decoder_heads=16,
      mask_ratio=0.75,  # share of patches masked, independently per example.
      norm_pix_loss=False,  # ViP: MSE on raw (normalised-to-[-1,1]) pixels.
  ))

  # Phase 1: non-private MAE on synthetic images (public; costs no privacy).
  # Paper: MAE's recipe on Shaders21k (1.05M images, 400 epochs at B=4096,
  # 40 warm-up epochs, blr 1.5e-4, wd 0.05) [verify].
  c.pretrain = ml_collections.ConfigDict(dict(
      # "synthetic:textures" | "folder:<dir>" | "tfds:<name>" |
      # "arrayrecord:<glob>" (real Shaders21k images; see data/sources.py).
      source="synthetic:textures",
      data_dir="",  # TFDS data_dir ("" = TFDS default).
      split="train",
      num_examples=1_050_000,  # synthetic sources are generated at this N.
      image_key="image",  # record field of real sources holding the image.
      augment=True,  # RandomResizedCrop(0.2-1) + flip (MAE's).
      flip=True,
      steps=102_539,  # 0 = skip phase 1 (random init or init_checkpoint).
      batch_size=4096,  # expected (Poisson) batch.
      base_learning_rate=1.5e-4,  # blr: lr = blr * batch_size / 256.
      optimizer="adamw",  # "adamw" | "sgd".
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      momentum=0.0,  # for sgd.
      warmup_steps=10_254,
      decay_steps=0,  # cosine horizon; 0 = steps.
  ))
  c.pretrain.learning_rate = (  # peak lr; follows blr and B unless set.
      c.pretrain.get_ref("base_learning_rate")
      * c.pretrain.get_ref("batch_size").to_float() / 256.0)

  # Phase 2: the private images.
  c.data.update(dict(
      # "arrayrecord:<dir>" (python -m dpjax.prepare output; module
      # doc) | "tfds:<name>" | "folder:<dir>" | "arrayrecord:<glob>" |
      # "synthetic:shapes" | "synthetic:classes".
      source="arrayrecord:/data/laion-ar",
      data_dir="",
      split="train",
      num_examples=233_804_767,  # N (dedup LAION-233M); synthetic: generated.
      image_key="image",
      image_size=224,  # both phases and the evaluation use this size.
      augment=True,  # RandomResizedCrop(0.2-1) (ViP's DP stage).
      flip=True,
      # Held-out PUBLIC data with labels for the probe and held-out loss.
      eval_source="synthetic:shapes",
      eval_split="test",
      eval_num_examples=2000,
      # Labelled PUBLIC images of the "probe_train" / "probe_test" data: a
      # TFDS dataset (ImageNet-1k, prepared manually as TFDS documents:
      # put the ILSVRC2012 tars in <data_dir>/downloads/manual), a prepared
      # "arrayrecord:<dir>", or "" = eval_source's probe_*_split splits.
      probe_source="tfds:imagenet2012",
      probe_data_dir="",
      probe_train_split="train",  # its first probe_train_examples records
                                  # (a subset of the paper's full split).
      probe_test_split="validation",  # ImageNet's labelled held-out split.
      probe_labels="label",  # comma-separated integer label fields.
      probe_train_examples=10_000,
      probe_test_examples=10_000,
  ))

  c.privacy.update(dict(
      l2_clip_norm=0.1, noise_multiplier=0.48, target_epsilon=8.0,
      accountant="rdp"))  # ViP: Opacus RDP accountant.
  # The paper's delta = 1/(2N), following data.num_examples unless set
  # explicitly (the tiny preset uses dpjax's default N^-1.1, smaller).
  c.privacy.delta = 0.5 / c.data.get_ref("num_examples").to_float()

  c.train.update(
      steps=6000, batch_size=98_304, microbatch_size=768, b1=0.9, b2=0.95,
      weight_decay=0.005, warmup_steps=1000, decay_steps=0,
      dtype="float32",  # no AMP in ViP's DP stage (fp32 per-example grads).
      checkpoint_every=50, log_every=10, num_workers=16)
  # blr of the DP phase: lr = blr * B / 256 (PRETRAIN.md's template
  # value 1.5e-5 -> 5.76e-3 at B=98,304) [verify for LAION].
  c.train.base_learning_rate = 1.5e-5
  c.train.learning_rate = (  # peak lr; follows blr and B unless set.
      c.train.get_ref("base_learning_rate")
      * c.train.get_ref("batch_size").to_float() / 256.0)
  common.paper_memory(c, inner=12)  # 12 examples per v5p chip: 1 chunk.

  # Evaluators (configs/common.py:base_config). The recipe's functions:
  # features (pred_kw last_k=k: the MAE protocol's last k blocks), mae_loss;
  # its data: test (image, rng), probe_train / probe_test (image and the
  # data.probe_labels fields of data.probe_source).
  c.evals = ml_collections.ConfigDict(dict(
      # protocol "mae": pooled tokens of the last k blocks, concatenated,
      # standardised, optax-trained linear head (ViP's main_linprobe.py);
      # "logreg": pooled final tokens, centred + L2-normalised, sklearn
      # logistic regression (DP-Cap's protocol).
      linear_probe=dict(
          type="linear_probe", log_steps=0, labels="label",
          train_data="probe_train", test_data="probe_test", protocol="mae", pred_kw=dict(last_k=12), mae_epochs=90,
          mae_batch_size=16_384, mae_base_lr=0.1, mae_optimizer="lars"),
      # MAE loss on the held-out images (fixed masks).
      heldout_loss=dict(type="heldout_mae_loss", log_steps=0, prefix="mae"),
  ))

  if arg.preset == "tiny":
    c.model.update(dict(
        variant="mu/8", width=64, depth=3, num_heads=4, mlp_dim=256,
        decoder_width=64, decoder_depth=2, decoder_heads=4))
    c.pretrain.update(dict(
        num_examples=100_000, augment=False, flip=True, steps=400,
        batch_size=256, base_learning_rate=1e-3, weight_decay=0.05,
        warmup_steps=40))
    c.data.update(dict(
        source="synthetic:shapes", num_examples=20_000, image_size=32,
        augment=False, flip=True, eval_num_examples=1000))
    c.privacy.noise_multiplier = -1.0  # calibrated to epsilon 8 at start.
    c.privacy.delta = -1.0  # dpjax's default, N^-1.1.
    c.privacy.accountant = "pld"  # tighter than RDP at this q; no RDP
                                  # convergence warnings at small sigma.
    c.mesh.fsdp = 1
    c.train.update(dict(
        inner_microbatch=0,
        steps=200, batch_size=512, microbatch_size=256, warmup_steps=20,
        checkpoint_every=100, log_every=20, num_workers=0))
    c.train.base_learning_rate = 1e-3  # lr = 2e-3 at B=512.
    c.data.update(dict(probe_train_examples=2000, probe_test_examples=1000))
    c.data.update(dict(probe_source="", probe_train_split="probe",
                       probe_test_split="test", probe_labels="shape,color"))
    c.evals.linear_probe = dict(type="linear_probe", log_steps=0,
                                labels="shape,color", protocol="logreg",
                                train_data="probe_train",
                                test_data="probe_test")
  elif arg.preset != "paper":
    raise ValueError(f"configs/vip.py:{arg.preset}: unknown preset; "
                     "use :paper or :tiny")
  if arg.smoke:
    if arg.preset != "paper":
      raise ValueError(f"configs/vip.py:{arg.preset},smoke: smoke modifies "
                       ":paper only")
    c.pretrain.update(dict(num_examples=64, steps=1, batch_size=4,
                           warmup_steps=0))
    c.data.update(dict(num_examples=64, eval_num_examples=8))
    c.evals.linear_probe.log_steps = -1  # Off.
    c = common.paper_smoke(c, get_config("tiny"))
  return c
