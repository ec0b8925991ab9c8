"""Peak host memory of the data path does not grow with the dataset's size.

Two generated image folders, 400 and 4,000 images of 64×64×3 (12 KiB each decoded: the larger
split is 44 MiB decoded, 176 MiB as float32), are each read by a fresh process the way a run
reads them: load (lazy records), public/private split, 10 public steps, 10 private Poisson steps
of the same expected size, and an evaluation pass over the test split, through the streaming
pipeline. Reading the larger split whole anywhere would raise the peak by tens of MiB.

The sources are .tar archives: a folder source is hashed file by file at each load, which holds
its listing (about 1.4 KiB per file, briefly): O(N) in the number of files, not their pixels.
"""

import json
import pathlib
import subprocess
import sys

from dpjax import data
from dpjax.data import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]

READER = """
import json, resource, sys
import jax
import numpy as np
from dpjax import data, parallel
from dpjax.data import pipeline
from dpjax.privacy import sampling
from dpjax.train import engine

folder, cache = sys.argv[1], sys.argv[2]
train = data.load_dataset("image_folder", "train", folder, cache)
test = data.load_dataset("image_folder", "test", folder, cache)
parts = data.split_dataset(train, 0.1, seed=0)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mesh = parallel.make_mesh(1, 1)
# One thread, one step ahead: a fixed number of batches in flight, so the peak is repeatable.
batches = engine.Batches(mesh, data.to_float, parts, data.ShuffledOrder(len(parts.public), 32, 0),
                         pipeline.Options(threads=1, prefetch=1), 20, lambda t: t < 10,
                         lambda t: t >= 10)
sampler = sampling.PoissonSampler(len(parts.private), 64 / len(parts.private), 32, seed=1)
seen = 0
for t in range(20):
  if t < 10:
    seen += int(batches.public(t)["label"].shape[0])
  for batch, mask in (batches.private(t, sampler) if t >= 10 else ()):
    seen += int(np.asarray(mask).sum())
for batch, mask in batches.evaluation(test, 20):  # 5 or 50 batches: the buffer fills
  seen += int(np.asarray(mask).sum())
batches.close()
print(json.dumps(dict(seen=seen, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      loaded=loaded, train=len(train), test=len(test))))
"""


def _peak(tmp_path, images_per_class: int) -> dict:
  folder = tmp_path / f"folder{images_per_class}"
  testing.write_image_folder(folder, classes=("a", "b", "c", "d"), shape=(64, 64, 3),
                             counts={"train": images_per_class, "test": images_per_class // 4},
                             suffixes=(".jpg",))
  archive = testing.pack(folder, tmp_path / f"images{images_per_class}.tar")
  for split in ("train", "test"):  # built here: the reader only reads (building is not measured)
    data.load_dataset("image_folder", split, archive, tmp_path / "cache")
  done = subprocess.run([sys.executable, "-c", READER, str(archive), str(tmp_path / "cache")],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                             "PATH": "/usr/bin:/bin"})
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_the_dataset_size(tmp_path):
  small, large = _peak(tmp_path, 100), _peak(tmp_path, 1000)
  assert (small["train"], large["train"]) == (400, 4000)
  assert large["seen"] > large["test"]  # it did read batches
  assert abs(large["loaded"] - small["loaded"]) < 4 * 2**20, (small, large)  # loading: lazy
  growth = large["peak"] - small["peak"]
  # The large split's train images alone are 44 MiB decoded (176 MiB as float32).
  assert growth < 12 * 2**20, (small, large)
  print(f"peak growth {growth / 2**20:.1f} MiB")
