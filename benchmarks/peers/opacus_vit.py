"""Opacus's DP step against timm's non-private step on timm's ViT-B/16, in dpjax's row format.

Per configuration (grad_sample_mode × batch), each in its own process, on random data (the same
batch every step, on the device), both steps in that process so their ratio compares like with
like, eager PyTorch (no torch.compile: Opacus's hooks):
  non-DP step = timm `vit_base_patch16_224` (random init, 1000 classes), forward and loss under
                `torch.autocast(bfloat16)` (as timm's train.py with --amp-dtype bfloat16),
                backward, `torch.optim.AdamW(lr=1e-4, weight_decay=0.05)` step;
  DP step     = the same architecture (layout below) and optimizer made private by Opacus's
                `PrivacyEngine.make_private` (flat clipping at --clip_norm, Gaussian noise of
                --noise_multiplier, fixed batches: poisson_sampling=False), forward and loss
                under the same autocast, `loss.backward()` (ghost mode: Opacus's two backward
                passes), the DP optimizer's step (clip, noise, AdamW, its accountant's hook).
                Opacus 1.6 tests bf16 autocast in every mode (its mixed_precision_test.py).
--dtype float32: no autocast, TF32 matmuls.
Each is timed as dpjax's harness times its steps (`benchmarks.timing.time_calls`): a first step
(its extra seconds are the row's compile_s), --warmup untimed steps, then --windows windows of
--steps steps with one `torch.cuda.synchronize()` each; examples/s from the median window.
Peak memory: `torch.cuda.max_memory_allocated()`, reset before each step's model is built.

Layout: on timm's ViT as timm builds it, Opacus computes the per-sample gradients of the whole
network by torch.func in every mode (its class token and position embedding are parameters of
the model itself) and gives no layer ghost norms. By default (`--layout opacus_ready`) the DP
step's model is made ready for Opacus without changing its function
(`benchmarks/peers/timm_models.py`): every nn.Linear then gets ghost norms in ghost mode.
`--layout stock` times the DP step on timm's model as it is (rows marked "timm stock layout");
the non-DP step always uses timm's model as it is. A DP row's details["opacus_paths"] counts
the trainable layers per Opacus path.

  python -m benchmarks.peers.opacus_vit --modes ghost,nonprivate --batches 32,64,128,256 \\
      --out $OUT/opacus.json
  python -m benchmarks.peers.opacus_vit --model vit_test --batches 4 --steps 2 --windows 1 \\
      --warmup 0 --dtype float32 --modes ghost,hooks,nonprivate   # CPU smoke run

Modes: Opacus's grad_sample_mode names (ghost, hooks, functorch, ew) and "nonprivate" (timm's
step alone, no DP row). Needs torch, timm and opacus (GPU: `benchmarks/peers/run_peers.sh`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys

from benchmarks.peers import search

BENCHMARK = "peers.opacus_vit"
MODES = ("ghost", "hooks", "functorch", "ew", "nonprivate")
LAYOUTS = ("opacus_ready", "stock")  # `timm_models.LAYOUTS` (that module imports torch)
# harness model key -> (timm model name, its kwargs, image shape [C, H, W], classes): the
# architectures of `benchmarks.harness.MODELS` (vit_test: width 192, patch 8, 32×32, depth 2)
TIMM_MODELS = {
    "vit_b16_224": ("vit_base_patch16_224", {}, (3, 224, 224), 1000),
    "vit_test": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), (3, 32, 32),
                 10),
}
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.05  # AdamW, as `benchmarks.harness.Steps`


def run_one(args: argparse.Namespace) -> dict:
  """One configuration's raw measurement (`benchmarks.peers.search`): timm's non-private step,
  then (unless mode is "nonprivate") Opacus's DP step, each on a freshly built model."""
  import opacus
  import timm
  import torch

  from benchmarks import timing
  from benchmarks.peers import timm_models

  timm_name, timm_kwargs, shape, classes = TIMM_MODELS[args.model]
  build = lambda layout: timm_models.make_model(timm_name, timm_kwargs, classes, layout)

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs: TF32 matmuls, as timm's train.py
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  generator = torch.Generator(device).manual_seed(0)
  images = torch.randn((args.batch,) + shape, generator=generator, device=device)
  labels = torch.randint(0, classes, (args.batch,), generator=generator, device=device)
  dtype = getattr(torch, args.dtype)
  autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

  def measure(name: str, make_step) -> dict:
    gc.collect()
    if cuda:
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    step = make_step()
    wait = (lambda out: torch.cuda.synchronize()) if cuda else (lambda out: None)
    host: list[float] = []
    first_s, step_s = timing.time_calls(step, wait, args.windows, args.steps, host,
                                        warmup=args.warmup)
    peak = torch.cuda.max_memory_allocated() if cuda else timing.max_rss_bytes()
    return {f"{name}_examples_per_s": args.batch / step_s, f"{name}_step_ms": 1e3 * step_s,
            f"{name}_dispatch_ms": 1e3 * statistics.median(host),
            f"{name}_compile_s": max(first_s - step_s, 0.0), f"{name}_peak_memory_bytes": peak}

  def training_step(model, optimizer, criterion):
    def step():
      optimizer.zero_grad(set_to_none=True)
      with autocast():
        loss = criterion(model(images), labels)
      loss.backward()
      optimizer.step()
      return loss
    return step

  def non_private():  # timm's model as timm builds it
    model = build("stock").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    return training_step(model, optimizer, torch.nn.CrossEntropyLoss())

  paths: dict[str, int] = {}

  def private():
    model = build(args.layout).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=args.batch)
    criterion = torch.nn.CrossEntropyLoss()
    common = dict(module=model, optimizer=optimizer, data_loader=loader,
                  noise_multiplier=args.noise_multiplier, max_grad_norm=args.clip_norm,
                  clipping="flat", poisson_sampling=False, grad_sample_mode=args.mode)
    paths.update(timm_models.opacus_paths(model, args.mode))
    engine = opacus.PrivacyEngine()
    if args.mode == "ghost":
      model, optimizer, criterion, _ = engine.make_private(criterion=criterion, **common)
    else:
      model, optimizer, _ = engine.make_private(**common)
    return training_step(model, optimizer, criterion)

  result = dict(model=args.model, dtype=args.dtype, batch=args.batch, microbatch=args.batch,
                microbatches=1, method=None if args.mode == "nonprivate" else args.mode,
                clip="flat", device=torch.cuda.get_device_name() if cuda else "cpu")
  result.update(measure("non_dp", non_private))
  if args.mode != "nonprivate":
    result.update(measure("dp", private))
  num_params = sum(p.numel() for p in build("stock").parameters())
  result["details"] = dict(
      framework=f"opacus {opacus.__version__}, timm {timm.__version__}, torch {torch.__version__}",
      timm_model=timm_name, layout=args.layout, num_params=num_params,
      grad_sample_mode=args.mode, opacus_paths=paths or None, sampling="fixed batch",
      noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm, warmup=args.warmup,
      windows=args.windows, steps=args.steps, optimizer="torch.optim.AdamW(lr=1e-4, wd=0.05)",
      autocast=args.dtype if dtype != torch.float32 else None)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modes", default="ghost",
                      help=f"comma-separated, of {','.join(MODES)} (nonprivate: timm alone)")
  parser.add_argument("--model", default="vit_b16_224", choices=sorted(TIMM_MODELS))
  parser.add_argument("--layout", default="opacus_ready", choices=LAYOUTS,
                      help="opacus_ready: timm's ViT with cls_token/pos_embed in a submodule and "
                           "timm's LayerNorm given Opacus's LayerNorm sampler (the same "
                           "function; Opacus's layer paths apply); stock: timm's model as is")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  parser.add_argument("--mode", default="", help=argparse.SUPPRESS)  # internal
  search.add_flags(parser, batches="32,64,128,256", steps=5)
  args = parser.parse_args()
  if args.mode:
    print(json.dumps(run_one(args)))
    return
  modes = args.modes.split(",")
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    sys.exit(f"unknown --modes {unknown}: choose from {MODES}.")
  flags = search.common_flags(args) + [f"--model={args.model}", f"--layout={args.layout}",
                                       f"--warmup={args.warmup}"]
  search.run_and_print(
      "benchmarks.peers.opacus_vit", BENCHMARK,
      search.configurations(modes, search.parse_batches(args.batches)),
      lambda config: [f"--mode={config['mode']}", f"--batch={config['batch']}"] + flags, args,
      variant=["timm stock layout"] if args.layout == "stock" else [])


if __name__ == "__main__":
  main()
