"""timm's ViT made ready for Opacus, and the count of its layers per Opacus path. Imports torch,
timm and opacus: only the measuring subprocess of `benchmarks.peers.opacus_vit` imports it.

Opacus picks a layer's path by its exact type: a norm sampler (ghost norms: nn.Linear), else a
registered grad sampler (nn.LayerNorm, nn.Conv2d, ...), else torch.func, which also takes every
layer under it. Two things in timm's ViT miss the first two paths:
- `cls_token` and `pos_embed` are parameters of the model itself, so the whole network goes to
  torch.func in every grad_sample_mode (no ghost norms at all);
- its norms are `timm.layers.LayerNorm`, a subclass of nn.LayerNorm, so each goes to torch.func.
Layout "opacus_ready" moves the two parameters into a submodule that applies them as timm's
`_pos_embed` does (the model computes the same function; the submodule goes to torch.func, a
concatenation and an addition) and registers Opacus's own nn.LayerNorm grad sampler for timm's
LayerNorm (the same function while timm's fast-norm option is off, its default). Layout "stock"
leaves timm's model as it is.
"""

from __future__ import annotations

import types

import timm
import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping)
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from torch import nn

LAYOUTS = ("opacus_ready", "stock")


class Tokens(nn.Module):
  """[n, patches, width] -> [n, 1 + patches, width]: prepends the class token [1, 1, width] and
  adds the position embedding [1, 1 + patches, width], as timm's `_pos_embed` does for the
  original ViT layout (class token covered by the position embedding)."""

  def __init__(self, cls_token: nn.Parameter, pos_embed: nn.Parameter):
    super().__init__()
    self.cls_token, self.pos_embed = cls_token, pos_embed

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


def make_model(timm_name: str, kwargs: dict, classes: int, layout: str) -> nn.Module:
  """timm's `timm_name` (random init, `classes` outputs), as timm builds it ("stock") or made ready
  for Opacus ("opacus_ready": `move_tokens`, `register_timm_layer_norm`; see the module doc)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  model = timm.create_model(timm_name, pretrained=False, num_classes=classes, **kwargs)
  if layout == "opacus_ready":
    move_tokens(model)
    register_timm_layer_norm()
  return model


def register_timm_layer_norm() -> None:
  """Registers Opacus's nn.LayerNorm grad sampler for `timm.layers.LayerNorm` (every mode that
  uses grad samplers, ghost's included). Refuses timm's fast-norm option, another function."""
  if getattr(timm.layers, "is_fast_norm", lambda: False)():
    raise ValueError("timm's fast norm is on: its LayerNorm is not nn.LayerNorm's function, so "
                     "Opacus's LayerNorm grad sampler does not apply. Turn it off "
                     "(timm.layers.set_fast_norm(False)) or use --layout stock.")
  register_grad_sampler(timm.layers.LayerNorm)(compute_layer_norm_grad_sample)


def move_tokens(vit: nn.Module) -> None:
  """Moves `vit.cls_token` and `vit.pos_embed` into `vit.tokens` (`Tokens`) and routes timm's
  `_pos_embed` through it (then its position dropout, as timm's)."""
  if (getattr(vit, "reg_token", None) is not None or getattr(vit, "no_embed_class", False)
          or getattr(vit, "dynamic_img_size", False) or vit.cls_token is None
          or vit.pos_embed is None):
    raise ValueError("only a timm ViT with a class token, a position embedding that covers it, "
                     "no register tokens and a fixed image size can have its tokens moved; use "
                     "--layout stock for this model.")
  tokens = Tokens(vit.cls_token, vit.pos_embed)
  del vit.cls_token, vit.pos_embed
  vit.cls_token = vit.pos_embed = None  # timm's code tests them for None
  vit.tokens = tokens
  # An instance attribute shadows the method timm's forward_features calls; a bound method, so
  # that a deep copy of the model (Opacus copies layers) calls its own copy's tokens.
  object.__setattr__(vit, "_pos_embed", types.MethodType(_tokens_then_dropout, vit))


def _tokens_then_dropout(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
  return vit.pos_drop(vit.tokens(x))


def opacus_paths(model: nn.Module, mode: str) -> dict[str, int]:
  """How many trainable layers Opacus's grad_sample_mode `mode` treats each way, by its registries
  and its rule that a layer with parameters of its own and no grad sampler goes to torch.func
  together with its children: {"ghost norm": a norm sampler (nn.Linear; ghost mode),
  "grad sampler": a registered per-sample gradient sampler, "functorch": torch.func over the
  layer (functorch mode: every layer)}. Empty for "ew" (expanded weights, no hooks)."""
  if mode == "ew":
    return {}
  hooks = GradSampleHooksFastGradientClipping if mode == "ghost" else GradSampleHooks
  norms = hooks.NORM_SAMPLERS if mode == "ghost" else {}
  counts = {"ghost norm": 0, "grad sampler": 0, "functorch": 0}

  def visit(module: nn.Module) -> None:
    kind = type(module)
    if any(p.requires_grad for p in module.parameters(recurse=False)):
      counts["ghost norm" if kind in norms else
             "grad sampler" if kind in hooks.GRAD_SAMPLERS and mode != "functorch" else
             "functorch"] += 1
      if kind not in hooks.GRAD_SAMPLERS:
        return  # torch.func takes its children with it
    for child in module.children():
      visit(child)

  visit(model)
  return counts
