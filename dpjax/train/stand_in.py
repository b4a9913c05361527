"""Shape-only stand-ins for real data, so `dpjax.plan` runs without it.

A `:paper` preset points at data this machine may not have (LAION,
ImageNet-21k, a WordPiece vocab file). The plan needs only shapes and N:
each real source (and a missing vocab file) is replaced by the `:tiny`
preset's synthetic value at the same config field, N and the example
shapes stay the preset's, and every replacement is returned as a note.
"""

import os

# Fields next to a replaced source that apply to real data only (synthetic
# stand-ins refuse them): they take the small preset's values.
REAL_DATA_ONLY = ("heldout_user_fraction",)


def _leaves(cfg, prefix=""):
  for k, v in cfg.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", k, v


def _is_stand_in(name: str, value) -> bool:
  """A data source / tokenizer the plan swaps for the preset's synthetic
  one: real data, a vocab file (shapes are all the plan needs)."""
  if not isinstance(value, str) or not value:
    return False
  if name.endswith("source"):
    return not value.startswith("synthetic:")
  return name == "tokenizer" and value.startswith("wordpiece:") and not (
      os.path.exists(value.split(":", 1)[1]))


def stand_in_data(config, small) -> tuple[object, list[str]]:
  """`config` with every real data source (and missing vocab file) replaced
  by `small`'s synthetic value at the same field. Sizes (N, image size,
  caption length, vocab size, classes) stay `config`'s, except fields of a
  replaced source that real data would fill (its split, and its
  `<prefix>*` fields left 0/empty, e.g. synthetic identities per user) or
  that only real data takes (REAL_DATA_ONLY): those are `small`'s.
  Returns (copy, notes naming each replaced field)."""
  out = config.copy_and_resolve_references()
  notes = []
  small_leaves = {path: v for path, _, v in _leaves(small)}
  for path, name, value in _leaves(config):
    new = small_leaves.get(path)
    if _is_stand_in(name, value) and isinstance(new, str) and new and (
        not _is_stand_in(name, new)):
      node = out
      for part in path.split(".")[:-1]:
        node = node[part]
      with node.unlocked():
        node[name] = new
      notes.append(f"{path}={value!r} stood in by {new!r} (same shapes and "
                   "N; records are never read)")
      if name.endswith("source"):  # Sizes real data would give: the preset's.
        prefix = name[:-len("source")]
        for k in node.keys():
          if k.startswith(prefix) and k != name and (
              k in (prefix + "split", *REAL_DATA_ONLY) or not node[k]) and (
                  small_leaves.get(path[:-len(name)] + k) not in (None,
                                                                  node[k])):
            with node.unlocked():
              node[k] = small_leaves[path[:-len(name)] + k]
            notes.append(f"  {path[:-len(name)] + k}: stand-in's {node[k]!r}")
  return out, notes
