"""Other DP libraries timed on dpjax's benchmark model, in dpjax's row format.

  opacus_vit.py       Opacus (PyTorch) on timm's ViT-B/16, and timm's non-private step
  timm_models.py      timm's ViT made ready for Opacus (same function), Opacus's path per layer
  jax_privacy_vit.py  jax_privacy's clipped_grad on dpjax's own Flax ViT-B/16
  search.py           their shared parent side: a configuration per subprocess, a batch search
                      that stops at out-of-memory, rows of `benchmarks.schema`, the fastest
                      batch of a search the plain row
  table.py            one markdown table of every row of several files, side by side
  run_peers.sh        the whole comparison in one GPU command (installs the peers' wheels)

Neither peer is a dependency of dpjax: the GPU command installs them from carried wheels, and
nothing here imports torch, opacus or jax_privacy outside a measuring subprocess.
"""
