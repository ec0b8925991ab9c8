"""Orbax checkpoints of the whole training state, verified on restore.

A checkpoint holds the device state (params, optimizer state with the noise PRNG key, step, the
run's mechanism secret) and a JSON record (privacy ledger, the config's trajectory blocks, a
digest of the device state). The Poisson sampler is a pure function of (secret, step), so the
step is its whole state. The noise key and the secret make a training checkpoint as sensitive as
the private data: release params only (README, "Privacy sharp edges").

Restoring never silently starts afresh: a checkpoint that cannot be read, whose digest does not
match its arrays, or whose config differs from the current one raises an error that says what to do.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpjax import config as config_lib, parallel, pytrees

PyTree = Any


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (corrupt, or made by a different config)."""


def state_digest(state: PyTree) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for a in jax.tree_util.tree_leaves(parallel.to_host(state)):
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


class Checkpointer:
  """Saves and restores (state, record) under `workdir/checkpoints/<step>`. Close it (or use it
  as a context manager) when done: orbax's manager keeps threads until then."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def close(self) -> None:
    """Waits for a save in flight and stops the manager's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def save(self, step: int, state: PyTree, record: dict) -> None:
    """Saves step `step`; a step already saved is kept (the state at a step never changes)."""
    if step in self._manager.all_steps():
      return
    record = dict(record, digest=state_digest(state))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))
    self._manager.wait_until_finished()

  def restore(self, template: PyTree, expected_config: dict) -> tuple[PyTree, dict] | None:
    """The latest checkpoint as (state, record), or None when there is none.

    template: a state pytree with the right structure, shapes and dtypes.
    expected_config: the current config's trajectory blocks; must equal the saved ones.
    """
    step = self.latest_step()
    if step is None:
      self._refuse_unreadable_leftovers()
      return None
    where = os.path.join(self.directory, str(step))
    state, record = self.read(step, template)
    if state_digest(state) != record.get("digest"):
      raise CheckpointError(
          f"The checkpoint at {where} is corrupt: its arrays do not match the digest saved with "
          "them. Move it away to restart from an earlier checkpoint, or use a new --workdir.")
    _check_same_config(record.get("config"), expected_config, where)
    return state, record

  def read(self, step: int, template: PyTree | None = None) -> tuple[PyTree, dict]:
    """(state, record) at `step`, as `template`'s pytree, or as saved (nested dicts of arrays)
    without one. Raises CheckpointError if the files cannot be read; checks nothing else."""
    abstract = (None if template is None
                else jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f"The checkpoint at {os.path.join(self.directory, str(step))} could not be read "
          f"({type(e).__name__}: {e}). It may be corrupt or from another model. Move it away to "
          "restart from an earlier checkpoint, or use a new --workdir to start afresh.") from e
    return restored["state"], dict(restored["record"])

  def read_record(self, step: int | None = None) -> dict:
    """The JSON record (ledger, config, plan, digest) at `step` (default: the latest) without
    reading the arrays. Raises CheckpointError when there is none or it cannot be read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"There is no checkpoint in {self.directory}.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          record=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(f"The record of the checkpoint at "
                            f"{os.path.join(self.directory, str(step))} could not be read "
                            f"({type(e).__name__}: {e}).") from e
    return dict(restored["record"])

  def _refuse_unreadable_leftovers(self) -> None:
    if os.path.isdir(self.directory) and any(
        name.isdigit() or ".orbax-checkpoint-tmp" in name for name in os.listdir(self.directory)):
      raise CheckpointError(
          f"{self.directory} holds checkpoint folders that are not complete (an interrupted "
          "save?). Remove them to start afresh, or use a new --workdir.")


def _check_same_config(saved: dict | None, current: dict, where: str) -> None:
  if saved is None:
    raise CheckpointError(f"The checkpoint at {where} has no config record; it was not written by "
                          "dpjax's trainer. Use a new --workdir.")
  diffs = config_lib.trajectory_differences(saved, current)
  if diffs:
    raise CheckpointError(
        f"The checkpoint at {where} was made with a different config ({'; '.join(diffs)}). "
        "Resume with the same config, or use a new --workdir for the new one.")


def _source_step(manager: Checkpointer, step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"There is no checkpoint in {manager.directory} to start from; train "
                          "there first or fix finetune.init_from.")
  return step


def source_record(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, record) of `workdir`'s checkpoint at `step` (default: the latest), without reading its
  arrays: the privacy ledger, plan and config of a run that another run starts from."""
  with Checkpointer(workdir) as manager:
    step = _source_step(manager, step)
    return step, manager.read_record(step)


def restore_params(workdir: str, template: PyTree, keep_template: Callable[[str], bool]
                   = lambda top_module: False, step: int | None = None) -> PyTree:
  """The params of `workdir`'s checkpoint at `step` (default: the latest; any dpjax run, any
  optimizer), checked against `template` (the model's freshly initialised params): same leaves,
  same shapes. Top-level modules for which keep_template(name) is True keep the template's values
  (e.g. a head that is re-initialised for fine-tuning). Raises CheckpointError with what differs."""
  with Checkpointer(workdir) as manager:
    step = _source_step(manager, step)
    where = manager.directory
    saved = manager.read(step)[0]["params"]
  flat_saved = {pytrees.path_to_names(path): v
                for path, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  problems, leaves = [], []
  for path, t in jax.tree_util.tree_flatten_with_path(template)[0]:
    names = pytrees.path_to_names(path)
    name = "/".join(names)
    if keep_template(names[0]):
      leaves.append(t)
    elif names not in flat_saved:
      problems.append(f"{name} missing")
    elif tuple(flat_saved[names].shape) != tuple(t.shape):
      problems.append(f"{name}: saved {tuple(flat_saved[names].shape)} vs model {tuple(t.shape)}")
    else:
      leaves.append(np.asarray(flat_saved[names], dtype=t.dtype))
  if problems:
    raise CheckpointError(
        f"The params at {where}/{step} do not fit this model ({'; '.join(problems[:8])}). Use the "
        "same model config as the run that wrote them (finetune.reset_head=True re-initialises "
        "a head of another size).")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
