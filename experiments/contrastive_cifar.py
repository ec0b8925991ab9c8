"""DP contrastive (SimCLR-style) pre-training on cifar10_jpeg with Logit-DP, naive per-row DP,
no privacy and no training, then a linear probe (issue 29 §1; Kong et al., Logit-DP,
references/papers.md §3). The study: experiments/contrastive_cifar.sh, its README
experiments/results/contrastive_cifar/README.md.

  python -m dpjax.main --config=experiments/contrastive_cifar.py:METHOD[,BATCH] --workdir=DIR \\
      --config.dp.target_epsilon=8

METHOD: logit_dp | naive | nonprivate | random_init (`contrastive_loop.METHODS`).
BATCH: the expected batch size, 128 (default) or 512. Both train for EPOCHS passes over the
  50,000 training images in expectation (steps = EPOCHS · 50,000 / BATCH): the same data, so the
  larger batch has fewer, less noisy steps. Logit-DP's sensitivity does not grow with the batch,
  the naive method's does ((2·max − 1)·C, max ≈ BATCH + 5√BATCH).

Privacy: the 50,000 training images are private (labels never read in pre-training); the unit is
one image (both of its views), add/remove adjacency; δ = 1e-5, PLD accounting, σ calibrated so
that the run's ε is dp.target_epsilon for the steps it runs. The linear probe reads no private
example: it trains on one half of the 10,000 test images (fixed split) and is scored on the
other half (`contrastive_loop.probe_data`).

Encoder: the ResNet-18-like network with GroupNorm (`models.resnet`: CIFAR stem, stages of two
basic blocks) at WIDTH = 16 channels in its first stage (ResNet-18's layout at a quarter of its
width: 0.74M parameters with the projection head), representation 128 (its head's output),
projection Dense(128)-tanh-Dense(32), cosine similarities at τ = 1. The width is set by cost:
a Logit-DP step costs ~4·n²·F FLOPs for n examples and F the encoder's forward FLOPs per view,
so full-width ResNet-18 (F 16× larger) or WRN-16-4 (26× more per pair) do not fit the GPU budget
(experiments/results/contrastive_cifar/README.md: the CPU compile-time FLOP and memory counts).
Both pair paths run without embedding Jacobians (`contrastive.pair_method="ghost"`), the encoder
in bfloat16 (norms, factors and sums in float32, the ghost bounds include the rounding).
"""

import ml_collections

from dpjax import config as config_lib
from dpjax.train import contrastive_loop

TRAIN_IMAGES = 50_000
EPOCHS = 1.0
WIDTH = 16
# Per expected batch: perf.microbatch_size (the batch is padded to a multiple of it and each
# padded size compiles once: 64 keeps a run to about two sizes, B and B + 64, for some padding)
# and perf.row_chunk for Logit-DP (shifts of n pairs formed at once) and for naive (rows formed
# at once), sized from XLA's CPU memory estimate (README) to ≤ ~25 GB a run.
BATCHES = {128: dict(microbatch_size=64, row_chunk=dict(logit_dp=8, naive=16)),
           512: dict(microbatch_size=64, row_chunk=dict(logit_dp=2, naive=16))}


def steps_for(batch: int, epochs: float = EPOCHS) -> int:
  """Training steps of `epochs` expected passes over the training images at batch `batch`."""
  return max(1, round(epochs * TRAIN_IMAGES / batch))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  given = (arg or "logit_dp").split(",")
  method, batch = given[0], int(given[1]) if len(given) > 1 else 128
  if method not in contrastive_loop.METHODS or batch not in BATCHES or len(given) > 2:
    raise ValueError(f"experiments/contrastive_cifar.py takes METHOD[,BATCH] with METHOD in "
                     f"{contrastive_loop.METHODS} and BATCH in {sorted(BATCHES)}, got {arg!r}.")
  c = config_lib.default_config()
  c.data.update(name="cifar10_jpeg", public_fraction=0.0, in_memory=True)
  c.model.update(name="resnet18", width=WIDTH, num_groups=8)
  c.dp.update(clip="flat", clip_norm=1.0, target_epsilon=8.0, delta=1e-5, accountant="pld",
              expected_batch_size=batch)
  c.contrastive = contrastive_loop.default_block()
  c.contrastive.update(method=method, pair_method="ghost", temperature=1.0,
                       representation_dim=128, hidden_dim=128, embedding_dim=32)
  c.contrastive.augment.crop_scale_min = 0.2
  c.contrastive.probe.update(datasets="cifar10_jpeg", steps=500)
  perf = BATCHES[batch]
  # Perf only (never the privacy event).
  c.perf.update(microbatch_size=perf["microbatch_size"], dtype="bfloat16",
                row_chunk=perf["row_chunk"].get(method, 8))
  c.optimizer.update(name="adam", learning_rate=1e-3)
  steps = steps_for(batch)
  c.schedule.total_steps = steps
  c.eval.every_steps = max(1, steps // 2)
  c.checkpoint.every_steps = max(1, steps // 2)
  c.log_every_steps = max(1, steps // 10)
  return c
