"""DP contrastive (SimCLR-style) pre-training on Fashion-MNIST, then linear probes (Kong et al.,
Logit-DP; references/papers.md §3).

  logit_dp     Logit-DP: per-pair similarity gradients clipped to dp.clip_norm, sensitivity
               (2C/τ)(1 + e^{2/τ}) whatever the batch size
  naive        DP-SGD on the loss's rows (each ∇ℓ_i clipped to dp.clip_norm), sensitivity
               (2·max_batch − 1)·C, growing with the batch
  nonprivate   the same training without clipping or noise
  random_init  no training: probes of the initial encoder

  python -m dpjax.main --config=experiments/contrastive.py:logit_dp --workdir=W/logit_dp \\
      --config.dp.target_epsilon=8
  experiments/contrastive.sh W      # every method at ε ∈ {3, 8}, results table

The encoder is Tramèr & Boneh's tanh CNN (no BatchNorm) with 64 outputs as the representation, a
Dense(128)-tanh-Dense(32) projection head, cosine similarity at temperature τ. Expected batch 256
of the 60,000 training images (q ≈ 0.0043), 1,000 steps (≈ 4.3 epochs), δ = 1e-5. On CIFAR-10
(`--config.data.name=cifar10 --config.contrastive.probe.datasets=cifar10`) it runs the same way
where TFDS can download the data.
"""

import ml_collections

from dpjax import config as config_lib
from dpjax.train import contrastive_loop


def get_config(arg: str = "logit_dp") -> ml_collections.ConfigDict:
  if arg not in contrastive_loop.METHODS:
    raise ValueError(f"experiments/contrastive.py takes one of {contrastive_loop.METHODS}, "
                     f"got {arg!r}.")
  c = config_lib.default_config()
  c.data.update(name="fashion_mnist", public_fraction=0.0)
  c.model.name = "cnn_tanh"
  c.dp.update(clip="flat", clip_norm=1.0, target_epsilon=3.0, delta=1e-5, accountant="pld",
              expected_batch_size=256)
  c.contrastive = contrastive_loop.default_block()
  c.contrastive.method = arg
  # Perf only (never the privacy event): the batch is padded to a multiple of microbatch_size;
  # pair gradients are formed row_chunk rows at a time; Jacobians jacobian_chunk views at a time
  # (0: all at once).
  c.perf.update(microbatch_size=64, row_chunk=16, jacobian_chunk=0)
  c.optimizer.update(name="adam", learning_rate=1e-3)
  c.schedule.update(total_steps=1000)
  c.eval.update(every_steps=250)
  c.checkpoint.every_steps = 500
  return c
