"""DP fine-tuning at small scale: which layers to train (Cattan et al. 2022) and private sparse
fine-tuning (SPARTA, Makni et al. 2025), on the tanh CNN.

  pretrain   non-private training on MNIST (public: every example, no private set)
  finetune   DP fine-tuning on Fashion-MNIST (private: every training example) from
             finetune.init_from (set it to the pretrain workdir), to dp.target_epsilon (default 3)

  python -m dpjax.main --config=experiments/finetune.py:pretrain --workdir=W/pretrain
  python launch/sweep.py --config=experiments/finetune.py:finetune --workdir=W/eps3 \\
      --set=finetune.init_from=W/pretrain --sweep=finetune.selection=all,head,last_blocks,bias \\
      --sweep=optimizer.learning_rate=0.5,1,2
  experiments/finetune.sh W   # everything in experiments/results/finetune.md

finetune.sparse.method=sparta: 40 warm-up steps (head and biases only), 20 selection steps
(no update; rows scored by the steps' own noisy sums), then the top 20% of rows of every conv /
hidden kernel; magnitude / random: the same fraction of rows chosen at step 0. Every variant
takes the same 300 private steps at the same ε (selection steps included).
"""

import ml_collections

from dpjax import config as config_lib

PRETRAIN_STEPS = 600
FINETUNE_STEPS = 300


def get_config(arg: str = "finetune") -> ml_collections.ConfigDict:
  if arg not in ("pretrain", "finetune"):
    raise ValueError(f"experiments/finetune.py takes pretrain or finetune, got {arg!r}.")
  c = config_lib.default_config()
  c.model.name = "cnn_tanh"
  c.dp.update(clip="flat", clip_norm=1.0, target_epsilon=3.0, delta=1e-5, accountant="pld",
              expected_batch_size=1024)
  c.perf.microbatch_size = 512
  c.eval.update(every_steps=100, batch_size=2000)
  c.checkpoint.every_steps = 1000
  if arg == "pretrain":
    c.data.update(name="mnist", public_fraction=1.0)
    c.optimizer.update(name="adam", learning_rate=1e-3)
    c.schedule.update(total_steps=PRETRAIN_STEPS, public_batch_size=256)
    c.mixing.update(schedule="switch", switch_step=PRETRAIN_STEPS)
    return c
  c.data.update(name="fashion_mnist", public_fraction=0.0)
  c.optimizer.update(name="sgd", learning_rate=1.0, momentum=0.9)
  c.schedule.update(total_steps=FINETUNE_STEPS, public_batch_size=256)
  c.mixing.update(schedule="switch", switch_step=0)
  c.finetune.sparse.update(fraction=0.2, warmup_steps=40, selection_steps=20)
  return c
