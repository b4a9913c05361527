r"""DP continual pretraining with limited public data (Bu et al., NeurIPS 2024).

One run, two phases (`dpjax/recipes/dp_continual.py`):
  1. "public": NON-private supervised pretraining with AdamW on a small public
     share of the data (paper: 10%). Spends no privacy; nothing is recorded
     in the ledger.
  2. "dp": DP-AdamW (the loop's Poisson sampling + per-example automatic
     clipping g C/(|g|+gamma) + one Gaussian draw per step, then AdamW) on the
     private rest. At the switch AdamW's first moment m is re-initialised and
     the second moment v and the step count are kept (paper's "R1").
The public share is a split of `data.source` decided record by record
(public with probability `data.public_fraction` by a keyed hash of the
record and `data.split_seed`: one record added or removed moves no other)
or a second source (`public.source`); the private phase samples from a view
over ONLY the private records, and epsilon, delta (N_priv^-1.1) and N cover
only the private share and the DP steps. The guarantee covers the private
share only: the public share must really be public (released data, or data
whose owners consented); a split of one private dataset gives its public
share NO protection.

Paper preset (default): supervised ViT-B/16 from scratch; public =
ImageNet-1k-sized share, private = ImageNet-11k (ImageNet-21k-P), epsilon 8.
Bu et al. report 41.5% top-1 on ImageNet-21k at epsilon 8. The exact B,
epochs, LR and delta of that run are not in the sources we read: the values
below are placeholders marked [verify]. ImageNet-21k-P is not in the TFDS
catalogue: convert it (train and validation) once, an image folder with a
captions.jsonl of {"file": "n01440764/x.JPEG", "label": 0} lines (or
webdataset tars with .cls members: --format=webdataset --label_key=cls):
  python -m dpjax.prepare --input=/data/in21k-p/train --format=folder \
      --caption_key= --label_key=label --image_size=256 \
      --output=/data/in21k-p-ar/train
  (the same for validation -> /data/in21k-p-ar/val; data.num_examples = the
  train manifest's N)

  python -m dpjax.main --config=configs/dp_continual.py --workdir=runs/cont
  python -m dpjax.main --config=configs/dp_continual.py:tiny \
      --workdir=runs/cont_tiny
  # the comparison arms (same epsilon and total steps):
  ... :tiny --config.arm=private_only   (DP from scratch on the private share)
  ... :tiny --config.arm=public_only    (non-private on the public share)
  ... :tiny --config.switch.reset=none  (keep m; "both" re-inits m and v)

`:tiny` trains a 64-d x 3 ViT (patch 8, 32x32) on the embedded 30-class
shapes data (`synthetic:classes`; 1% public: 191 images, DP batch 256)
on a CPU in about 2-3 minutes per arm.

`:paper,smoke` runs the paper's model at full size (supervised ViT-B/16 at
224x224 with the 11,221-class head, automatic clipping, bfloat16) for ONE
step of each phase on the embedded labelled shapes (N=640, 10% public;
expected batch 4, microbatches of 2), then the head's accuracy on 8 images
(no tr(H) monitor, probe or fine-tuning):

  python -m dpjax.main --config=configs/dp_continual.py:paper,smoke \
      --workdir=runs/s
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` = "paper" (default) | "tiny" |
  "paper,smoke"."""
  arg = common.parse_arg(arg, smoke=False)
  c = common.base_config("dp_continual")
  # Which arm to train; all arms use public.steps + train.steps steps:
  #   "continual": public phase (public.steps) then DP phase (train.steps);
  #   "private_only": DP from scratch on the private share for all steps;
  #   "public_only": non-private on the public share for all steps (never
  #     reads the private share; no private phase: epsilon null);
  #   "nonprivate": non-private on public + private data (no-DP reference;
  #     results.json: private false, epsilon null).
  c.arm = "continual"

  c.model = ml_collections.ConfigDict(dict(
      variant="B/16",  # dpjax.models.classifier variant ("tiny" = "mu/4").
      width=0,  # encoder overrides of the variant (0 = the variant's).
      depth=0,
      num_heads=0,
      mlp_dim=0,
      patch_size=0,
      pooling="mean",  # "mean" | "mean_all" | "cls".
  ))

  c.data.update(dict(
      # Labelled images; "tfds:<name>" | "arrayrecord:<glob>" |
      # "folder:<dir>" | "synthetic:classes" (see dpjax/data/sources.py).
      source="arrayrecord:/data/in21k-p-ar/train",
      data_dir="",  # TFDS data_dir ("" = TFDS default).
      split="train",
      num_examples=11_797_632,  # N (synthetic: generated at this size);
                                # ImageNet-21k-P fall11 train [verify].
      # Public share of data.source when public.source is "" (paper: 10%).
      public_fraction=0.1,
      split_seed=0,  # public seed of the record-wise public/private split.
      image_key="image",  # record fields of real sources.
      label_key="label",
      num_classes=11_221,  # ImageNet-21k-P fall11 classes [verify].
      image_size=224,
      augment=True,  # RandomResizedCrop(0.2-1) + flip (fastDP's timm).
      flip=True,
      # Held-out labelled data for the classifier-head accuracy.
      eval_source="arrayrecord:/data/in21k-p-ar/val",
      eval_split="validation",
      eval_num_examples=10_000,
      # Downstream labelled data of the probe and fine-tuning evaluators.
      probe_source="tfds:cifar100",
      probe_data_dir="",
      probe_train_split="train[:10000]",
      probe_test_split="test",
      probe_labels="label",  # comma-separated label fields.
      probe_train_examples=10_000,
      probe_test_examples=10_000,
  ))

  # Phase 1: non-private AdamW on the public data [verify: B, steps, lr].
  c.public = ml_collections.ConfigDict(dict(
      source="",  # "" = the public_fraction share of data.source; else a
                  # second source (same label space), e.g. "tfds:imagenet2012".
      data_dir="",
      split="train",
      num_examples=1_281_167,  # synthetic second sources are this size.
      steps=15_000,  # 0 (continual arm) = no public phase.
      batch_size=4096,  # expected (Poisson) batch.
      optimizer="adamw",  # "adamw" | "sgd".
      learning_rate=1e-3,
      b1=0.9,
      b2=0.999,
      weight_decay=0.05,
      momentum=0.0,  # for sgd.
      warmup_steps=1500,
      decay_steps=0,  # cosine horizon; 0 = the phase's steps.
  ))

  # Optimizer handling at the public -> DP switch (Bu et al. Fig. 8).
  c.switch = ml_collections.ConfigDict(dict(
      # "m": re-init Adam's first moment, keep v and the count (paper, R1);
      # "none": keep m, v and count; "both": fresh AdamW state;
      # "v": re-init v, keep m and count (ablation).
      reset="m",
  ))

  c.privacy.update(dict(
      clipping="normalize",  # fastDP's automatic clipping (AUTO-S).
      l2_clip_norm=1.0,  # fastDP fixes max_grad_norm=1.
      normalize_gamma=0.01,
      noise_multiplier=-1.0,  # calibrated to target_epsilon.
      target_epsilon=8.0,
      # dpjax's default N_priv^-1.1: the paper's delta is not in the
      # sources we read (fastDP's code defaults to 1/(2N)) [verify].
      delta=-1.0,
      accountant="rdp",  # fastDP default.
  ))

  # Phase 2 (DP-AdamW on the private share) [verify: B, steps, lr].
  c.train.update(
      steps=2000, batch_size=65_536, microbatch_size=1024, b1=0.9, b2=0.999,
      learning_rate=5e-4, weight_decay=0.05, warmup_steps=0, decay_steps=0,
      dtype="bfloat16", checkpoint_every=50, log_every=10, num_workers=16)
  common.paper_memory(c, inner=8)  # 16 examples per v5p chip: 2 chunks.

  # Training diagnostics on held-out PUBLIC data (eval_source, split below):
  # per-step held-out loss decrease and a Hutchinson estimate of tr(H).
  c.monitor = ml_collections.ConfigDict(dict(
      enabled=True,
      split="validation[:256]",  # held-out split of data.eval_source.
      num_examples=256,  # fixed held-out batch.
      probes=4,  # Rademacher probes per tr(H) estimate.
      trace_every=100,  # steps between tr(H) estimates (at log steps).
  ))

  # Evaluators (configs/common.py:base_config). The recipe's functions:
  # logits, features; its data: test (data.eval_source), probe_train,
  # probe_test (image and the data.probe_labels fields).
  c.evals = ml_collections.ConfigDict(dict(
      # Head top-1/top-5 + CE on data.eval_source.
      classifier=dict(type="classifier_accuracy", log_steps=0),
      # Downstream logistic regression on frozen features.
      linear_probe=dict(type="linear_probe", log_steps=0, labels="label",
                        train_data="probe_train", test_data="probe_test"),
      # Non-private full fine-tuning of backbone + a new zero linear head
      # (Bu et al. Table 4, standard fine-tuning) [verify: steps, B, lr, wd]:
      # AdamW, 5% warm-up then cosine to 0; LP-FT: the head alone for
      # head_only_steps at a constant head_learning_rate; decoupled weight
      # decay on >= 2-d params only.
      fine_tune=dict(
          type="fine_tune", log_steps=0, label="label",
          train_data="probe_train", test_data="probe_test", steps=2000,
          batch_size=256, learning_rate=1e-4, head_only_steps=500,
          head_learning_rate=1e-3, weight_decay=0.05),
  ))

  if arg.preset == "tiny":
    c.model.update(dict(variant="mu/8", width=64, depth=3, num_heads=4,
                        mlp_dim=256))
    c.data.update(dict(
        source="synthetic:classes", num_examples=20_000, num_classes=30,
        image_size=32, augment=False, flip=False,
        public_fraction=0.01,  # ~200 (191) public: "limited" public data.
        eval_source="synthetic:classes", eval_split="test",
        eval_num_examples=2000))
    c.public.update(dict(
        num_examples=2000, steps=200, batch_size=128, learning_rate=3e-3,
        b2=0.95, weight_decay=0.005, warmup_steps=30))
    c.privacy.accountant = "pld"  # tighter than RDP at this q.
    c.mesh.fsdp = 1
    c.train.update(dict(
        inner_microbatch=0,
        # One 512-row microbatch holds a Poisson draw of ~256 +- 16.
        steps=200, batch_size=256, microbatch_size=512, learning_rate=2e-3,
        b2=0.95, weight_decay=0.005, warmup_steps=0, dtype="float32",
        checkpoint_every=100, log_every=10, num_workers=0))
    c.monitor.update(dict(split="monitor", num_examples=128, probes=2,
                          trace_every=50))
    c.data.update(dict(
        probe_source="synthetic:classes", probe_train_split="probe",
        probe_test_split="test", probe_labels="label",
        probe_train_examples=2000, probe_test_examples=2000))
    c.evals.fine_tune.update(dict(
        steps=300, batch_size=64, learning_rate=1e-3, head_only_steps=100,
        head_learning_rate=1e-2, weight_decay=0.005))
  elif arg.preset != "paper":
    raise ValueError(f"configs/dp_continual.py:{arg.preset}: unknown preset; "
                     "use :paper or :tiny")
  if arg.smoke:
    if arg.preset != "paper":
      raise ValueError(f"configs/dp_continual.py:{arg.preset},smoke: smoke "
                       "modifies :paper only")
    c.data.update(dict(num_examples=640, eval_num_examples=8))
    c.public.update(dict(steps=1, batch_size=4, warmup_steps=0))
    c.monitor.enabled = False
    c.evals.linear_probe.log_steps = c.evals.fine_tune.log_steps = -1  # Off.
    c = common.paper_smoke(c, get_config("tiny"))
  return c
