"""The trainer's private-step rate on real JPEG data, by number of grain workers.

Runs `dpjax.train.loop.train_and_evaluate` on cifar10_jpeg (all data private, Poisson batches of
expected size --batch, microbatches of 256, ghost clipping, bfloat16) for --short and --long
steps with each --workers value; (long − short) steps ÷ the difference of their train_seconds is
the rate of steady-state steps (compilation and start-up cancel). Set beside the DP step's rate
on synthetic data (`throughput.py`), it says whether the input holds training back.

  python -m benchmarks.trainer_input --model vit_cifar --workers 0,8 --out x.json
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks import harness
from benchmarks import rows as rows_lib

FORMAT = "dpjax-trainer-input/1"


def config_for(model: str, steps: int, batch: int, workers: int):
  from dpjax import config as config_lib
  c = config_lib.default_config()
  c.data.update(name="cifar10_jpeg", public_fraction=0.0, standardize=True, workers=workers)
  c.model.update(harness.MODELS[model][0])
  c.dp.update(clip="flat", clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None,
              expected_batch_size=batch, delta=1e-5)
  c.mixing.update(schedule="constant", alpha=0.0)
  c.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9)
  c.schedule.total_steps = steps
  c.perf.update(microbatch_size=256, per_example_method="ghost", dtype="bfloat16")
  c.eval.update(every_steps=10**9, batch_size=1000)
  c.checkpoint.every_steps = 10**9
  c.log_every_steps = 10**9
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="vit_cifar", choices=("vit_cifar", "wrn_16_4"))
  parser.add_argument("--workers", default="0,8")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--short", type=int, default=20)
  parser.add_argument("--long", type=int, default=220)
  rows_lib.add_output_flags(parser)
  args = parser.parse_args()
  from dpjax.train import loop
  rows = []
  for workers in map(int, args.workers.split(",")):
    seconds = {}
    for steps in (args.short, args.long):
      with tempfile.TemporaryDirectory() as workdir:
        r = loop.train_and_evaluate(config_for(args.model, steps, args.batch, workers), workdir,
                                    show_progress=False)
      seconds[steps] = r["train_seconds"]
    rate = (args.long - args.short) * args.batch / (seconds[args.long] - seconds[args.short])
    rows.append(dict(model=args.model, workers=workers, expected_batch=args.batch,
                     short=args.short, long=args.long, train_seconds=seconds,
                     examples_per_s=rate))
    print(f"{args.model} workers={workers}: {rate:,.0f} examples/s (expected batch "
          f"{args.batch}; train_seconds {seconds})", flush=True)
  rows_lib.write_rows(args.out, "benchmarks.trainer_input", rows, FORMAT, args.commit)


if __name__ == "__main__":
  main()
