"""DP-FedEmb's data: the private user-partitioned source, the public and
evaluation sources, and the held-out evaluation arrays (`dpfedemb.py` is the
recipe). Synthetic sources hold users out by disjoint identity ranges; real
user-keyed ones by a public hash of the user id (data.heldout_user_fraction,
`data.users.is_heldout_user`): the private source drops them and the
evaluation keeps only them.
"""

import ml_collections
import numpy as np

from dpjax.data import arrays
from dpjax.data import sources
from dpjax.data import transforms as transforms_lib
from dpjax.data import users as users_lib
from dpjax.errors import ConfigError


def _source(spec: str, split: str, config, *, num_identities: int = 0,
            first_identity: int = 0, user_keyed: bool = True):
  """A synthetic or real source; real ones renamed to image / label (and
  user, from data.user_key, unless ``user_keyed`` is False: the public
  data, e.g. tfds:mnist, has no user field)."""
  d = config.data
  fields = {"image": d.image_key, "label": d.label_key}
  if d.user_key and user_keyed:
    fields["user"] = d.user_key
  kwargs = {}
  if spec == "synthetic:identities":
    kwargs = dict(num_identities=num_identities,
                  images_per_identity=d.images_per_identity,
                  first_identity=first_identity)
  return sources.from_config(spec, split=split, seed=config.seed,
                             image_size=d.image_size, data_dir=d.data_dir,
                             fields=fields, **kwargs)


def _heldout_fraction(config, spec: str) -> float:
  """data.heldout_user_fraction for a real user-keyed source; 0 otherwise."""
  d = config.data
  frac = float(d.heldout_user_fraction)
  if not 0.0 <= frac < 1.0:
    raise ConfigError(f"config.data.heldout_user_fraction={frac}: use [0, 1)")
  if frac and spec == "synthetic:identities":
    raise ConfigError(
        f"config.data.heldout_user_fraction={frac} applies to real user-keyed "
        "sources; synthetic identities are held out by construction "
        "(disjoint identity ranges): set it to 0")
  if frac and not d.user_key:
    raise ConfigError("config.data.heldout_user_fraction needs data.user_key")
  return frac


def private_source(config: ml_collections.ConfigDict):
  """The user-partitioned private source (num_users, user_indices).

  Real sources: users (values of data.user_key) held out for evaluation by
  `data.users.is_heldout_user(user, data.heldout_user_fraction)` are left
  out entirely: never sampled, never trained on.
  """
  d = config.data
  frac = _heldout_fraction(config, d.source)
  src = _source(d.source, d.split, config, num_identities=d.num_users)
  if not hasattr(src, "num_users"):
    src = users_lib.UserKeyedSource(
        src, "user", "label",
        tuple(d.train_label_range) if d.train_label_range else None,
        keep_user=(lambda u: not users_lib.is_heldout_user(u, frac))
        if frac else None)
  return src


def public_source(config: ml_collections.ConfigDict):
  d = config.data
  return _source(d.public_source, d.public_split, config,
                 num_identities=d.public_num_identities,
                 first_identity=d.num_users, user_keyed=False)


def eval_source(config: ml_collections.ConfigDict):
  """The evaluation records (before the hold-out and label filters)."""
  d = config.data
  return _source(d.eval_source, d.eval_split, config,
                 num_identities=d.eval_num_identities,
                 first_identity=d.num_users + d.public_num_identities)


def transforms(config, label_field: str) -> list:
  """Decode, resize, normalise; `label_field` renamed to "label"."""
  s = config.data.image_size
  return [transforms_lib.DecodeImage(), transforms_lib.Resize(s),
          transforms_lib.Normalize(),
          transforms_lib.Rename({label_field: "label"}),
          transforms_lib.Keep(["image", "label"])]


def label_field(spec: str) -> str:
  """The label field of a source spec (synthetic identities: "identity")."""
  return "identity" if spec == "synthetic:identities" else "label"


def eval_indices(config: ml_collections.ConfigDict, src) -> list[int]:
  """Indices of the evaluation records of ``src`` (= `eval_source`).

  Records with a label in data.eval_label_range and, for real user-keyed
  sources with data.heldout_user_fraction > 0, only those of held-out users
  (`data.users.is_heldout_user`), the users `private_source` drops: the
  evaluation never sees a trained-on user. At most data.eval_num_examples,
  in source order.
  """
  d = config.data
  frac = _heldout_fraction(config, d.eval_source)
  field = label_field(d.eval_source)
  lo, hi = d.eval_label_range or (-np.inf, np.inf)
  out = []
  for i in range(len(src)):
    if len(out) >= d.eval_num_examples:
      break
    rec = src[i]
    if not lo <= int(rec[field]) < hi:
      continue
    if frac and not users_lib.is_heldout_user(rec["user"], frac):
      continue
    out.append(i)
  return out


def eval_arrays(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Held-out (open-set) "image" float32[n, S, S, 3] and "identity" int[n]."""
  d = config.data
  src = eval_source(config)
  ts = transforms(config, label_field(d.eval_source))
  idx = eval_indices(config, src)
  if not idx:
    raise ValueError(f"no evaluation records in {d.eval_source!r} (check "
                     "data.eval_label_range / data.heldout_user_fraction)")
  out = arrays.materialise(src, ts, idx, keep=("image", "label"))
  return {"image": out["image"], "identity": out["label"].astype(np.int64)}
