"""Examples/s the streaming input pipeline delivers, against what the DP step consumes.

What is timed is the host side of a private step, end to end: Poisson sampling of the step's rows
(`PoissonSampler`), reading exactly those ArrayRecord records, JPEG decoding, preprocessing to
float32, padding into fixed-shape microbatches, prefetched by a grain pipeline (`dpjax.data.pipeline`)
with `--workers` processes. Augmentation (crop + flip, K views) runs on the device, inside the DP
step, so it is part of the step's consumption rate, not of this one.

Datasets:
- cifar10_jpeg: the real 50,000 training images (32×32 JPEG q≈75, $DPJAX_DATA_DIR).
- jpeg224: --images cifar10_jpeg training images upscaled to 224×224 (bicubic) and re-encoded
  as JPEG q=75, written once as an image folder in --scratch (a stand-in for ImageNet-sized
  JPEGs; real ImageNet JPEGs are larger, about 400×350 on average, and slower to decode).

Consumers: --consumers names rows of a throughput JSON (benchmarks/throughput.py output) whose DP
examples/s the table sets beside the pipeline's; "pipeline ÷ step" > 1 means the input keeps up.

  python -m benchmarks.input_pipeline --dataset cifar10_jpeg --workers 0,2,4,8 --out x.json
  python -m benchmarks.input_pipeline --dataset jpeg224 --images 5000 --workers 0,4,8,14

Each setting is timed in windows of --window steps after a first window that drains the buffers
the workers filled; the rate is the median of the later windows (steady state: the consumer waits
on the producers).

Output JSON: {"format": FORMAT, "rows": [InputRow...]} and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import resource
import sys
import time
from typing import Any, TypedDict

import numpy as np

from benchmarks import schema

FORMAT = "dpjax-input-rows/1"


class InputRow(TypedDict):
  dataset: str           # "cifar10_jpeg" or "jpeg224"
  image_shape: list      # [H, W, C]
  num_examples: int      # N the sampler draws from
  expected_batch: int    # q·N
  microbatch: int        # rows per microbatch (the padding unit)
  workers: int           # grain worker processes (0: threads of the main process)
  threads: int           # reading threads per process
  steps: int             # steps timed (after a first window that drains the buffers)
  examples_per_s: float  # real examples delivered per second (median over windows)
  spread: list           # [min, max] over the timed windows
  window: int            # steps per window (at least what the buffers hold)
  first_window: float    # the untimed first window's rate (drained from full buffers)
  cpus: int              # CPUs the process could use
  peak_rss_bytes: int    # max RSS of the main process (workers not included)
  device: str            # host description
  commit: str | None
  date: str | None
  command: str


def _cifar_images(data_dir: str | None, split: str = "train"):
  from dpjax import data
  return data.load_dataset("cifar10_jpeg", split, data_dir)


def make_jpeg224(scratch: pathlib.Path, count: int, data_dir: str | None) -> pathlib.Path:
  """An image folder scratch/jpeg224_<count>/train/<class>/*.jpg of `count` upscaled images."""
  import PIL.Image
  folder = scratch / f"jpeg224_{count}"
  done = folder / ".complete"
  if done.exists():
    return folder
  source = _cifar_images(data_dir)
  pixels = source.images[np.arange(count)]
  for i, (image, label) in enumerate(zip(pixels, source.labels[:count])):
    target = folder / "train" / f"class{label}" / f"{i:06d}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    big = PIL.Image.fromarray(image).resize((224, 224), PIL.Image.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=75)
    target.write_bytes(buffer.getvalue())
  done.touch()
  return folder


def time_pipeline(dataset, expected_batch: int, microbatch: int, workers: int, threads: int,
                  window: int, windows: int) -> dict[str, Any]:
  """Steady-state examples/s of a private stream over `dataset` (the main process's view).

  The stream reads steps ahead into buffers: its threads' (max(prefetch, threads) steps) in the
  main process and in each worker, and each worker's output buffer (prefetch steps). A window is
  at least all of them (`window` is raised to that). The first window starts once the workers are
  up and the buffers full, so it is drained from them and is not counted: each later window waits
  on the producers, and the rate is their median.
  """
  from dpjax.data import dataset as dataset_lib
  from dpjax.data import pipeline
  from dpjax.privacy import sampling
  sampler = sampling.PoissonSampler(len(dataset), expected_batch / len(dataset), microbatch)
  read = pipeline.ReadStep(dataset.images, dataset.labels, pipeline.PrivateDraw(sampler),
                           slice(None), dataset_lib.to_float)
  options = pipeline.Options(workers=workers, threads=threads, prefetch=2)
  # Each process's thread buffer, and each worker's output buffer.
  threads_buffer = max(options.prefetch, threads)
  window = max(window, threads_buffer + workers * (threads_buffer + options.prefetch))
  stream = pipeline.StepStream(read, lambda t: True, (windows + 1) * window + 1, options)
  try:
    stream.get(0)  # starts the workers
    time.sleep(1.0 + 0.5 * workers)  # ... and lets them fill the buffers
    rates = []
    for w in range(windows + 1):
      began, examples = time.perf_counter(), 0
      for t in range(1 + w * window, 1 + (w + 1) * window):
        examples += int(stream.get(t)["mask"].sum())
      rates.append(examples / (time.perf_counter() - began))
  finally:
    stream.close()
  steady = rates[1:]
  return dict(examples_per_s=float(np.median(steady)), spread=[min(steady), max(steady)],
              steps=window * windows, window=window, first_window=rates[0])


def markdown(rows: list[InputRow], consumers: dict[str, float]) -> str:
  """One line per row; a column per consumer: pipeline ex/s ÷ that model's DP step ex/s."""
  lines = ["| dataset | image | workers | threads | pipeline ex/s (spread) | CPUs |"
           + "".join(f" ÷ {name} DP ({rate:,.0f} ex/s) |" for name, rate in consumers.items()),
           "|---|---|---|---|---|---|" + "---|" * len(consumers)]
  for r in rows:
    ratios = "".join(f" {r['examples_per_s'] / rate:.1f} |" for rate in consumers.values())
    lines.append(f"| {r['dataset']} | {'×'.join(map(str, r['image_shape']))} | {r['workers']} | "
                 f"{r['threads']} | {r['examples_per_s']:,.0f} ({r['spread'][0]:,.0f}–"
                 f"{r['spread'][1]:,.0f}) | {r['cpus']} |{ratios}")
  return "\n".join(lines)


def consumer_rates(path: str | None, names: list[str]) -> dict[str, float]:
  """model -> DP examples/s from a throughput JSON's rows (the first DP row of each model)."""
  if not path:
    return {}
  rows = json.loads(pathlib.Path(path).read_text())["rows"]
  found = {}
  for row in rows:
    if row["mode"] == "dp" and row["model"] in names and row["model"] not in found:
      found[row["model"]] = row["examples_per_s"]
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", choices=("cifar10_jpeg", "jpeg224"), default="cifar10_jpeg")
  parser.add_argument("--images", type=int, default=5000, help="jpeg224: how many images")
  parser.add_argument("--scratch", default="/tmp/dpjax_input_bench")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--workers", default="0,2,4")
  parser.add_argument("--threads", type=int, default=4)
  parser.add_argument("--batch", type=int, default=1024, help="expected batch size q·N")
  parser.add_argument("--microbatch", type=int, default=256)
  parser.add_argument("--window", type=int, default=40, help="steps per timing window")
  parser.add_argument("--windows", type=int, default=4, help="windows timed (after a first one "
                      "that drains the buffers)")
  parser.add_argument("--consumers", default=None, help="throughput JSON with DP rows")
  parser.add_argument("--models", default="vit_cifar,wrn_16_4,vit_b16_224")
  parser.add_argument("--commit", default="")
  parser.add_argument("--device", default="")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  if args.dataset == "cifar10_jpeg":
    dataset = _cifar_images(args.data_dir)
  else:
    from dpjax import data
    folder = make_jpeg224(pathlib.Path(args.scratch), args.images, args.data_dir)
    dataset = data.load_dataset("image_folder", "train", str(folder),
                                cache_dir=str(pathlib.Path(args.scratch) / "cache"))
  provenance = schema.provenance(args.commit)
  rows: list[InputRow] = []
  for workers in map(int, args.workers.split(",")):
    timed = time_pipeline(dataset, args.batch, args.microbatch, workers, args.threads,
                          args.window, args.windows)
    rows.append(InputRow(
        dataset=args.dataset, image_shape=list(dataset.image_shape), num_examples=len(dataset),
        expected_batch=args.batch, microbatch=args.microbatch, workers=workers,
        threads=args.threads, steps=timed["steps"], examples_per_s=timed["examples_per_s"],
        first_window=timed["first_window"], window=timed["window"],
        spread=timed["spread"], cpus=len(os.sched_getaffinity(0)),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        device=args.device or "host CPU",
        command="python -m benchmarks.input_pipeline " + " ".join(sys.argv[1:]), **provenance))
    print(f"workers={workers}: {timed['examples_per_s']:,.0f} examples/s", flush=True)
  consumers = consumer_rates(args.consumers, args.models.split(","))
  print(markdown(rows, consumers))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(
        dict(format=FORMAT, consumers=consumers, rows=rows), indent=1))


if __name__ == "__main__":
  main()
