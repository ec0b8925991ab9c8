"""DP fine-tuning at CIFAR scale (issue 29 §2): which layers to train (Cattan et al. 2022) and
private sparse fine-tuning (SPARTA, Makni et al. 2025) on cifar10_jpeg, WRN-16-4 or the CIFAR ViT.

  pretrain[,REGIME[,MODEL]]   non-private training on the public part of REGIME
                              (PRETRAIN_STEPS steps of 1024; no private step)
  METHOD[,REGIME[,MODEL]]     DP fine-tuning on the private part (FINETUNE_STEPS private steps of
                              expected batch 1024) from finetune.init_from, to dp.target_epsilon
                              (default 3) over every private step that runs

  python -m dpjax.main --config=experiments/finetune_cifar.py:pretrain --workdir=W/pretrain/seed=0
  python -m dpjax.main --config=experiments/finetune_cifar.py:sparta --workdir=W/sparta \\
      --config.finetune.init_from=W/pretrain/seed=0
  bash experiments/finetune_cifar.sh W PART...   # the grids (experiments/results/finetune_cifar/)

REGIME and MODEL as in experiments/bu2024_cifar.py, whose setup this shares (`base_config`):
B (public: 5,000 training images of classes 0-4; private: the other 45,000, all ten classes;
default) or A (public: 10% of the training set, all classes); wrn (WRN-16-4, default) or vit (the
CIFAR ViT: patch 4, width 384, depth 6). A fine-tuning run must split the data as its source did
(same seed and REGIME): its private part is then disjoint from the public part the source trained
on without DP, and dpjax refuses a source split otherwise (`state.check_same_split`).

METHOD (`METHODS[model]`): a layer selection (`dpjax.finetune.select`)
  all          full fine-tuning
  head         the classifier head
  bias         BitFit: the head and every bias (WSConv / GroupNorm / LayerNorm / Dense)
  last_blocks  the last LAST_BLOCKS[model] blocks in call order, the final norm and the head
               (WRN: stage3_block2, 43% of the parameters; ViT: block4-5, 33%, as many as
               attention)
  attention    ViT only: the head and the attention projections (33% of the parameters)
  mlp          ViT only: the head and the MLP layers (66%)
or a sparse method over every kernel but the head (biases, gains, norms and the head train
whole), SPARSE["fraction"] of each kernel's output rows:
  sparta       SPARSE warm-up steps (prunable kernels frozen), selection steps (no update; rows
               scored by the steps' own noisy sums, each step accounted), then the top rows
  magnitude    the rows of largest L1 norm in the pre-trained weights, chosen at step 0
  random       random rows, chosen at step 0

The head: pre-training has ten outputs even in regime B (the model's classes are the dataset's),
so fine-tuning reuses the whole pre-trained model, head included (finetune.reset_head=False): the
five public classes' rows are trained, the other five were only pushed down by pre-training's
softmax and are learnt in fine-tuning, where every method trains the head. Re-initialising it
(--set=finetune.reset_head=True) would throw away the five trained rows.

Training as in bu2024_cifar's DP phase after a switch: Adam, cosine decay over the run after a
WARMUP_STEPS linear warm-up (the warm-up decided the result there), automatic clipping R = 1,
crop-and-flip, bfloat16, ghost clipping; σ calibrated with PLD so that the run ends at
dp.target_epsilon, δ = 1e-5. LEARNING_RATES[model]: the grid every method is tuned over (the
model's bu2024_cifar rate in the middle, ×1/4 and ×4 beside it).
"""

import importlib.util
import pathlib

import ml_collections


def _sibling(name: str):
  """experiments/<name>.py as a module (experiments/ is no package; configs load by path)."""
  spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name(
      f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bu2024_cifar = _sibling("bu2024_cifar")

PRETRAIN_STEPS = 200  # bu2024_cifar's best fixed switch: 200 public steps of 1024
FINETUNE_STEPS = 200  # and the 200 DP steps after it
WARMUP_STEPS = bu2024_cifar.WARMUP_STEPS
SELECTIONS = ("all", "head", "bias", "last_blocks", "attention", "mlp")
VIT_ONLY = ("attention", "mlp")
SPARSE_METHODS = ("sparta", "magnitude", "random")
SPARSE = dict(fraction=0.2, warmup_steps=30, selection_steps=20)  # 150 sparse steps of 200
LAST_BLOCKS = {"wrn": 1, "vit": 2}
METHODS = {model: tuple(m for m in SELECTIONS + SPARSE_METHODS
                        if model == "vit" or m not in VIT_ONLY)
           for model in bu2024_cifar.MODELS}
LEARNING_RATES = {model: tuple(lr * f for f in (0.25, 1.0, 4.0))
                  for model, (_, lr) in bu2024_cifar.MODELS.items()}
REGIMES = ("A", "B")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kind, regime, model = bu2024_cifar.split_arg(
      arg, ("all", "B", "wrn"),
      (("part", ("pretrain",) + SELECTIONS + SPARSE_METHODS), ("regime", REGIMES),
       ("model", bu2024_cifar.MODELS)))
  if kind != "pretrain" and kind not in METHODS[model]:
    raise ValueError(f"Method {kind!r} needs a model with attention and MLP blocks (vit); "
                     f"{model} takes {METHODS[model]}.")
  config = bu2024_cifar.base_config(regime, model)
  config.eval.every_steps = config.checkpoint.every_steps = 200
  if kind == "pretrain":
    config.schedule.total_steps = PRETRAIN_STEPS
    config.mixing.update(schedule="constant", alpha=1.0)  # public steps only
    return config
  config.schedule.total_steps = FINETUNE_STEPS
  config.mixing.update(schedule="switch", switch_step=0)  # private steps only
  config.dp.target_epsilon = 3.0
  config.finetune.num_blocks = LAST_BLOCKS[model]
  if kind in SPARSE_METHODS:
    config.finetune.sparse.update(method=kind, **SPARSE)
  else:
    config.finetune.selection = kind
  return config


def describe(what: str, model: str) -> str:
  """For experiments/finetune_cifar.sh: `what` of MODEL as a comma-separated list: selections,
  sparse, methods, or other_learning_rates (the grid's rates but the default, run by the ε parts)."""
  default = bu2024_cifar.MODELS[model][1]
  lists = dict(selections=[m for m in METHODS[model] if m in SELECTIONS], sparse=SPARSE_METHODS,
               methods=METHODS[model],
               other_learning_rates=[f"{lr:g}" for lr in LEARNING_RATES[model] if lr != default])
  return ",".join(lists[what])


if __name__ == "__main__":
  import sys
  print(describe(*sys.argv[1:]))
