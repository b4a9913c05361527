"""The passes of ``python -m dpjax.prepare`` (``__main__`` says what they
write): ``prepare(...)`` runs them all; ``__main__`` is its command line.
"""

import concurrent.futures
import dataclasses
import functools
import json
import os
import shlex
import shutil
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

from dpjax import private_files
from dpjax.data import manifest as manifest_lib
from dpjax.prepare import plan as prepare_plan
from dpjax.prepare import readers
from dpjax.prepare import stage as prepare_stage


def run_units(fn: Callable[[Any], str], units: Sequence[Any], runner: str,
              num_workers: int, beam_options: str = "",
              desc: str = "") -> None:
  """Runs ``fn`` on every unit: local processes (tqdm bar) or Beam."""
  if runner == "beam":
    # pylint: disable-next=g-import-not-at-top
    import apache_beam as beam
    opts = shlex.split(beam_options) or [
        "--runner=DirectRunner", f"--direct_num_workers={num_workers}"]
    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(
        opts)) as p:
      _ = (p | desc >> beam.Create(list(units)) | beam.Reshuffle()
           | beam.Map(fn))
    return
  bar = tqdm.tqdm(total=len(units), desc=desc, unit="shard")
  if num_workers <= 1:
    for u in units:
      fn(u)
      bar.update()
  else:
    with concurrent.futures.ProcessPoolExecutor(num_workers) as pool:
      for _ in pool.map(fn, units):
        bar.update()
  bar.close()


def _gather(work: str, names: Sequence[str]) -> dict[str, Any]:
  """Staged hashes, users, labels and drops of all shards, in order."""
  exact, near, users, labels, offsets, summaries = [], [], [], [], [0], []
  for name in names:
    s = prepare_stage.load_summary(work, name)
    e, d = prepare_stage.load_hashes(work, name)
    exact.append(e)
    near.append(d)
    users += s["users"] or []
    labels += s["labels"] or []
    offsets.append(offsets[-1] + len(d))
    summaries.append({"input": s["input"], "num_read": s["num_read"],
                      "dropped": s["dropped"]})
  return {"exact": np.concatenate(exact), "near": np.concatenate(near),
          "users": users, "labels": labels, "offsets": np.asarray(offsets),
          "summaries": summaries}


def _write_side_files(out: str, work: str, names: Sequence[str],
                      staged: dict[str, Any], plan: prepare_plan.Plan
                      ) -> dict[str, int]:
  """dropped.jsonl (+ users.jsonl, labels.npy); returns drops by reason."""
  counts: dict[str, int] = {}
  where = plan.output_index()
  # Which records were dropped, and duplicates of which: owner-only.
  with private_files.open_private(os.path.join(out, "dropped.jsonl")) as f:
    for k, name in enumerate(names):
      lo = staged["offsets"][k]
      for key, reason in staged["summaries"][k]["dropped"]:
        counts[reason] = counts.get(reason, 0) + 1
        f.write(json.dumps({"input_shard": name, "key": key,
                            "reason": reason}) + "\n")
      dups = np.flatnonzero(plan.reason[lo:staged["offsets"][k + 1]])
      if dups.size:
        keys = prepare_stage.load_summary(work, name)["keys"]
      for i in dups:
        reason = prepare_plan.DUPLICATE_REASONS[plan.reason[lo + i] - 1]
        counts[reason] = counts.get(reason, 0) + 1
        f.write(json.dumps({"input_shard": name, "key": keys[i],
                            "reason": reason, "kept_index": int(
                                where[plan.dup_of[lo + i]])}) + "\n")
  if plan.users is not None:
    ids, starts, stops = plan.users
    with open(os.path.join(out, "users.jsonl"), "w", encoding="utf-8") as f:
      for u, a, b in zip(ids, starts, stops):
        f.write(json.dumps([u, int(a), int(b)]) + "\n")
    if staged["labels"]:
      np.save(os.path.join(out, "labels.npy"),
              np.asarray(staged["labels"], np.int32)[plan.order])
  return counts


def _users_entry(plan: prepare_plan.Plan, has_labels: bool) -> dict | None:
  if plan.users is None:
    return None
  sizes = plan.users[2] - plan.users[1]
  return {"field": "user", "num_users": len(plan.users[0]),
          "ranges_file": "users.jsonl",
          "label_file": "labels.npy" if has_labels else None,
          "examples_per_user": {
              "min": int(sizes.min(initial=0)),
              "median": float(np.median(sizes)) if sizes.size else 0.0,
              "max": int(sizes.max(initial=0))}}


def prepare(input_spec: str, fmt: str, out: str,
            opts: prepare_stage.Options, *, dedup_mode: str = "exact",
            hamming_threshold: int = 4, runner: str = "local",
            num_workers: int = 1, records_per_shard: int = 10_000,
            beam_options: str = "", command: str = "") -> dict[str, Any]:
  """Runs all passes (see the module docstring); returns the manifest.

  A directory whose manifest was made with the same options is returned as
  is; one made with other options loses its manifest first, so that it
  reads as incomplete until this run finishes.
  """
  options = {"input": input_spec, "format": fmt,
             "records": dataclasses.asdict(opts), "dedup": dedup_mode,
             "hamming_threshold": hamming_threshold,
             "records_per_shard": records_per_shard}
  if manifest_lib.exists(out):
    old = manifest_lib.read(out)
    if old.get("options") == options:
      return old
    os.remove(manifest_lib.path_in(out))
  work = os.path.join(out, "_work")
  os.makedirs(work, exist_ok=True)
  shards = readers.list_shards(input_spec, fmt, records_per_shard)
  stage = functools.partial(prepare_stage.stage_shard, opts=opts,
                            work_dir=work)
  run_units(stage, shards, runner, num_workers, beam_options, "stage")
  names = [s.name for s in shards]
  staged = _gather(work, names)
  plan = prepare_plan.make_plan(
      staged["exact"], staged["near"],
      staged["users"] if opts.user_key else None, dedup_mode,
      hamming_threshold)
  bounds = prepare_plan.shard_bounds(plan.order.size, records_per_shard)
  shard_of = np.searchsorted(staged["offsets"], plan.order, side="right") - 1
  position = plan.order - staged["offsets"][shard_of]
  outputs = []
  for j, (a, b) in enumerate(bounds):
    used, local = np.unique(shard_of[a:b], return_inverse=True)
    outputs.append(prepare_stage.OutputShard(
        f"data-{j:05d}-of-{len(bounds):05d}.arrayrecord",
        tuple(names[k] for k in used), local.astype(np.int32),
        position[a:b], opts.fingerprint()))
  write = functools.partial(prepare_stage.write_shard, work_dir=work,
                            out_dir=out)
  run_units(write, outputs, runner, num_workers, beam_options, "write")
  dropped = _write_side_files(out, work, names, staged, plan)
  m = {
      "format_version": manifest_lib.VERSION,
      "num_examples": int(plan.order.size),
      "shards": [{"file": o.file, "num_examples": len(o)}
                 for o in outputs],
      "fields": ["image", "key"] + [
          f for f, k in (("caption", opts.caption_key),
                         ("user", opts.user_key), ("label", opts.label_key))
          if k],
      "image": {"policy": "resized" if opts.image_size else (
          "re-encoded" if opts.jpeg_quality else "original bytes"),
                "shorter_side": opts.image_size, "upscale": False,
                "jpeg_quality": (opts.jpeg_quality or (
                    prepare_stage.DEFAULT_JPEG_QUALITY
                    if opts.image_size else 0))},
      "source": {"input": input_spec, "format": fmt,
                 "input_shards": len(shards),
                 "records_read": sum(s["num_read"]
                                     for s in staged["summaries"]),
                 "caption_key": opts.caption_key, "user_key": opts.user_key,
                 "label_key": opts.label_key},
      "dedup": {"mode": dedup_mode,
                "exact_hash": "BLAKE2b-128 of the decoded RGB pixels and "
                              "their shape (not the file bytes)",
                "near_hash": "64-bit dHash, Hamming distance <= threshold",
                "hamming_threshold": (hamming_threshold
                                      if dedup_mode == "near" else None),
                "exact_duplicates": dropped.get("exact_duplicate", 0),
                "near_duplicates": dropped.get("near_duplicate", 0)},
      "dropped": dict(sorted(dropped.items())),
      "dropped_file": "dropped.jsonl",
      "users": _users_entry(plan, bool(staged["labels"])),
      "command": command,
      "options": options,
  }
  manifest_lib.write(out, m)
  shutil.rmtree(work)
  return m
