r"""Input pipeline throughput over a prepared ArrayRecord directory.

Measures records/s of the project's real Poisson pipeline
(``pipeline.poisson_batches`` + ``transforms.image_pipeline(S, augment=
True)``: read, JPEG decode, random-resized crop, flip, normalise, stack) on
an ``arrayrecord:<dir>`` written by ``python -m dpjax.prepare``, and
compares it with what a DP step consumes (examples/s of the DP step, e.g.
from RESULTS.md's dp_overhead table on the same machine). Without ``--dir``
it first makes one: ``--num_images`` smooth random JPEGs as img2dataset-
style tar shards, prepared with the default exact dedup and
``--prepare_size`` (its records/s is printed too).

Per worker process (one core, no threads): records/s of one step's Poisson
sample (``privacy.sampling.sample_indices``: random, ascending indices) vs
a sequential run of indices, read only and read + decode + crop + flip.
From the Poisson per-core rate and a projected accelerator step
(``--step_examples`` per ``--step_seconds``, default DP-Cap :paper on
v5p-128 from ``python -m dpjax.plan --config=configs/dpcap.py
--mesh=v5p-128``: 1,310,720 examples in 15 s) it prints the host cores a
paper step needs for decoding and augmentation.

Run (by hand, not in the test suite):
  .venv/bin/python benchmarks/input_pipeline.py
  ... --dir=/data/laion-ar --batch=256 --steps=10 --workers=0,2
"""

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from dpjax.data import pipeline
from dpjax.data import sources
from dpjax.data import transforms
from dpjax.prepare import run
from dpjax.prepare import stage
from dpjax.privacy import sampling


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
  grid = rng.integers(0, 256, (8, 8, 3), np.uint8)
  img = np.asarray(Image.fromarray(grid).resize(
      (size * 5 // 4, size), Image.Resampling.BICUBIC)).astype(np.int16)
  img += rng.integers(-12, 13, img.shape, np.int16)  # Texture: real-ish size.
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
      buf, "JPEG", quality=90)
  return buf.getvalue()


def make_dir(root: str, num_images: int, source_size: int,
             prepare_size: int, per_tar: int = 500) -> tuple[str, float]:
  """Writes tar shards and prepares them; returns (dir, prepare records/s)."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "tars"))
  for s in range(0, num_images, per_tar):
    with tarfile.open(os.path.join(root, "tars", f"{s:08d}.tar"), "w") as t:
      for i in range(s, min(s + per_tar, num_images)):
        for ext, data in (("jpg", _jpeg(rng, source_size)),
                          ("txt", f"a picture number {i}".encode())):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(data)
          t.addfile(info, io.BytesIO(data))
  out = os.path.join(root, "prepared")
  start = time.perf_counter()
  run.prepare(os.path.join(root, "tars"), "webdataset", out,
              stage.Options(image_size=prepare_size),
              num_workers=os.cpu_count() or 1, records_per_shard=1000)
  return out, num_images / (time.perf_counter() - start)


def _rate(it, steps: int) -> float:
  """Records/s over ALL steps, start-up included: grain prefetches steps in
  threads (and workers), so timing only later steps would time a buffer."""
  n, start = 0, time.perf_counter()
  for _ in range(steps):
    n += int(next(it)["batch_size"])
  rate = n / (time.perf_counter() - start)
  it.close()
  return rate


def per_process_rate(src, idx: np.ndarray, size: int, decode: bool) -> float:
  """Records/s of this one process (one core: no grain threads or workers)
  reading ``idx`` in order, and with ``decode`` also decoding, random-
  resized-cropping to ``size``, flipping and normalising each record."""
  ts = transforms.image_pipeline(size, augment=True) if decode else []
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i in idx:
    transforms.apply(ts, src[int(i)], rng)
  return len(idx) / (time.perf_counter() - start)


def access_orders(n_total: int, n: int) -> dict[str, np.ndarray]:
  """About ``n`` indices each: one Poisson step (random, ascending, as the
  DP pipeline reads them) and a sequential run from a random start."""
  poisson = sampling.sample_indices(0, 0, n_total, min(1.0, n / n_total))
  start = np.random.default_rng(0).integers(0, max(1, n_total - n))
  return {"Poisson random access": poisson,
          "sequential": np.arange(start, min(n_total, start + n))}


def pipeline_rate(src, batch: int, steps: int, size: int,
                  workers: int) -> float:
  it = pipeline.poisson_batches(
      src, sampling_rate=batch / len(src), global_microbatch=batch, seed=0,
      num_steps=steps, process_index=0, process_count=1,
      num_workers=workers,
      transforms=transforms.image_pipeline(size, augment=True))
  return _rate(it, steps)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dir", default="", help="prepared directory ('' = make)")
  ap.add_argument("--num_images", type=int, default=2000)
  ap.add_argument("--source_size", type=int, default=320)
  ap.add_argument("--prepare_size", type=int, default=256)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--workers", default="0,2")
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--dp_step_examples_per_s", type=float, default=43.2,
                  help="what the DP step consumes (RESULTS.md: vit_paper "
                  "ghost, batch 256, this CPU)")
  ap.add_argument("--per_process_records", type=int, default=600,
                  help="records per access-order measurement")
  ap.add_argument("--step_examples", type=float, default=1_310_720,
                  help="examples per projected accelerator step (DP-Cap "
                  ":paper batch)")
  ap.add_argument("--step_seconds", type=float, default=15.0,
                  help="projected step time (dpjax.plan, DP-Cap :paper on "
                  "v5p-128 at MFU 40%%)")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    directory, prep = args.dir, None
    if not directory:
      directory, prep = make_dir(tmp, args.num_images, args.source_size,
                                 args.prepare_size)
      print(f"prepare: {prep:.0f} records/s ({os.cpu_count()} workers)")
    src = sources.make_source(f"arrayrecord:{directory}")
    print(f"N={len(src)} from {directory}")
    orders = access_orders(len(src), args.per_process_records)
    per_core = {}
    print("| access order (1 process) | read only, records/s | read + decode"
          f" + crop {args.image_size} + flip, records/s |")
    print("|---|---|---|")
    for name, idx in orders.items():
      read, full = (statistics.median(
          per_process_rate(src, idx, args.image_size, decode)
          for _ in range(args.reps)) for decode in (False, True))
      per_core[name] = full
      print(f"| {name} ({idx.size} records) | {read:.0f} | {full:.0f} |")
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
      rows.append((f"Poisson pipeline, S={args.image_size}, augment",
                   str(w), statistics.median(
                       pipeline_rate(src, args.batch, args.steps,
                                     args.image_size, w)
                       for _ in range(args.reps))))
  print("| stage | grain workers | records/s | / DP step consumption |")
  print("|---|---|---|---|")
  for name, w, r in rows:
    print(f"| {name} | {w} | {r:.0f} | "
          f"{r / args.dp_step_examples_per_s:.1f}x |")
  need = args.step_examples / args.step_seconds
  core = per_core["Poisson random access"]
  print(f"A step of {args.step_examples:,.0f} examples every "
        f"{args.step_seconds:g} s consumes {need:,.0f} examples/s: "
        f"{need / core:,.0f} cores at this machine's {core:.0f} "
        "records/s per core (Poisson, decode + crop + flip).")


if __name__ == "__main__":
  main()
