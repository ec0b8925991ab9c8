"""The trainer's host-loop ceiling: its step rate on a model so small that the device barely works.

Runs `dpjax.train.loop.train_and_evaluate` on Fashion-MNIST with Tramèr & Boneh's tanh CNN (26k
parameters) for --short and --long steps; (long − short) ÷ the difference of the two runs'
train_seconds is the rate of steady-state steps (compilation and start-up cancel). Two loops:
- "dp": all data private, Poisson batches of expected size --batch in microbatches of --batch, flat
  clipping, σ = 1 (no target ε: nothing stops early);
- "nondp": all data public, α = 1 (the non-private loop: no sampling, no ledger, no noise).
With a model this small a step's device work is a fraction of a millisecond, so the rate says how
much host work (sampling, batch assembly, device puts, ledger, hooks) each step carries; a real
model's step must hide that work behind its own. --profile N then runs each long run once more
under cProfile and prints the N functions with the most own time (the timed runs are not
profiled).

  python -m benchmarks.host_loop --batch 256 --profile 15 --out x.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile

from benchmarks import rows as rows_lib

FORMAT = "dpjax-host-loop/1"
LOOPS = ("dp", "nondp")


def config_for(loop_name: str, steps: int, batch: int):
  """The run of one loop: the trainer's defaults but for the data split, batch and logging."""
  from dpjax import config as config_lib
  c = config_lib.default_config()
  private = loop_name == "dp"
  c.data.update(name="fashion_mnist", public_fraction=0.0 if private else 1.0)
  c.dp.update(clip="flat", clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None,
              expected_batch_size=batch)
  c.mixing.update(schedule="constant", alpha=0.0 if private else 1.0)
  c.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9)
  c.schedule.update(total_steps=steps, public_batch_size=batch)
  c.perf.update(microbatch_size=batch, per_example_method="vmap")
  c.eval.update(every_steps=10**9, batch_size=1000)
  c.checkpoint.every_steps = 10**9
  c.log_every_steps = 10**9
  return c


def timed_run(config, profile_top: int) -> tuple[float, str]:
  """(train_seconds, the profile's top `profile_top` lines by own time, or "")."""
  from dpjax.train import loop
  profiler = cProfile.Profile() if profile_top else None
  with tempfile.TemporaryDirectory() as workdir:
    if profiler:
      profiler.enable()
    result = loop.train_and_evaluate(config, workdir, show_progress=False)
    if profiler:
      profiler.disable()
  if not profiler:
    return result["train_seconds"], ""
  text = io.StringIO()
  pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile_top)
  return result["train_seconds"], text.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--loops", default="dp,nondp")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--short", type=int, default=20)
  parser.add_argument("--long", type=int, default=220)
  parser.add_argument("--profile", type=int, default=0, metavar="N")
  rows_lib.add_output_flags(parser)
  args = parser.parse_args()
  rows = []
  for name in args.loops.split(","):
    if name not in LOOPS:
      parser.error(f"--loops: {name!r} is not one of {', '.join(LOOPS)}")
    seconds = {steps: timed_run(config_for(name, steps, args.batch), 0)[0]
               for steps in (args.short, args.long)}
    profile = (timed_run(config_for(name, args.long, args.batch), args.profile)[1]
               if args.profile else "")
    steps_per_s = (args.long - args.short) / (seconds[args.long] - seconds[args.short])
    rows.append(dict(loop=name, batch=args.batch, short=args.short, long=args.long,
                     train_seconds=seconds, steps_per_s=steps_per_s,
                     ms_per_step=1000 / steps_per_s))
    print(f"{name}: {steps_per_s:,.1f} steps/s ({1000 / steps_per_s:.2f} ms per step; batch "
          f"{args.batch}; train_seconds {seconds})", flush=True)
    if profile:
      print(profile, flush=True)
  rows_lib.write_rows(args.out, "benchmarks.host_loop", rows, FORMAT, args.commit)


if __name__ == "__main__":
  main()
