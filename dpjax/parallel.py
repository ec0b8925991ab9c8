"""Device meshes, shardings, sharded per-example gradient sums and multi-host setup.

Layout. A 2-D mesh with axes ('data', 'fsdp'):
  * every batch (public, private microbatch) is split by rows over ALL devices, both axes;
  * params and optimizer state are replicated over 'data'; with fsdp > 1 each floating-point leaf
    is split over 'fsdp' along its largest dimension that fsdp divides (ZeRO-3 style), and leaves
    with no such dimension, integer leaves (PRNG keys, counts) and scalars stay replicated.
fsdp = 1 is plain data parallelism. The layout never changes what is computed, only where: a
sharded step equals the single-device step to float32 rounding (tests/parallel_test.py).

Per-example gradients under sharding (DESIGN.md, sharp edges). Gradient sums are computed inside
`shard_map` (`sharded_gradient_sum`): each device gathers the full params, makes them
device-varying over every mesh axis they are replicated on (`jax.lax.pcast`) so that `grad` sums
nothing across devices behind our back, computes and clips the per-example gradients of ITS rows,
and the clipped sums are then reduced explicitly (psum over 'data', psum_scatter over 'fsdp'). Each
example is clipped exactly once, on the device that holds it. The Gaussian noise is not drawn here
but once per global step from a replicated key (`dpjax.train.step.make_apply`), and
jax's partitionable threefry makes the draw the same whatever the layout.

Multi-host. `initialize_distributed` starts jax.distributed (an explicit coordinator, or detected
on SLURM, or on Cloud TPU pods when DPJAX_DISTRIBUTED=1); every process builds the same host-side
plan (samplers are functions of (secret, step)), reads only the rows of each batch its devices hold
(`process_rows`) and assembles global arrays with `jax.make_array_from_process_local_data`
(`global_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
P = PartitionSpec
MESH_AXES = ("data", "fsdp")
BATCH_SPEC = P(MESH_AXES)  # rows split over every device
PARTIAL_SPEC = P(MESH_AXES)  # per-device partial sums [devices, ...], one row on each device


class MeshError(ValueError):
  """The requested mesh cannot be built on the devices present, or a batch does not fit it."""


# ------------------------------------------------------------------------------------------------
# Meshes and shardings


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh of data × fsdp devices; data = -1 takes all devices left by fsdp.

  The axes are Auto (vmap(grad) runs under them). With several processes the mesh must span every
  device of every process. Raises MeshError for sizes that are not positive, that do not divide
  the device count, or that ask for more devices than are present.
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp <= 0 or (data <= 0 and data != -1):
    raise MeshError(f"mesh.data ({data}) and mesh.fsdp ({fsdp}) must be positive (data may be -1: "
                    "all devices).")
  if data == -1:
    if len(devices) % fsdp:
      raise MeshError(f"mesh.fsdp = {fsdp} does not divide the {len(devices)} devices present; "
                      "use a divisor of the device count.")
    data = len(devices) // fsdp
  if data * fsdp > len(devices):
    raise MeshError(
        f"The mesh asks for data × fsdp = {data} × {fsdp} = {data * fsdp} devices but only "
        f"{len(devices)} are present ({devices[0].platform}). Lower mesh.data / mesh.fsdp, or set "
        "mesh.data = -1 to use every device.")
  if jax.process_count() > 1 and data * fsdp != len(devices):
    raise MeshError(f"With {jax.process_count()} processes the mesh must use all {len(devices)} "
                    f"devices, not {data * fsdp}; set mesh.data = -1.")
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * fsdp])


def mesh_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in MESH_AXES]))


def leaf_spec(shape: Sequence[int], dtype: Any, fsdp: int) -> PartitionSpec:
  """The spec of one param / optimizer-state leaf: replicated, or split over 'fsdp' on one dim.

  The rule depends on shape and dtype alone, so an optimizer moment gets its param's layout.
  """
  if fsdp == 1 or not jnp.issubdtype(dtype, jnp.floating):
    return P()
  candidates = [d for d, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  return P(*([None] * dim + ["fsdp"]))


def state_specs(tree: PyTree, mesh: Mesh) -> PyTree:
  """A PartitionSpec for every leaf of params or optimizer state (see `leaf_spec`)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(lambda x: leaf_spec(np.shape(x), jnp.result_type(x), fsdp), tree)


def split_leaves(specs: PyTree) -> PyTree:
  """True for each leaf whose PartitionSpec splits it over some mesh axis (e.g. 'fsdp'), False for
  replicated leaves: the `split` argument of `dpjax.privacy.noise.add_gaussian_noise`."""
  return jax.tree_util.tree_map(lambda s: any(axis is not None for axis in s), specs,
                                is_leaf=_is_spec)


def shardings(specs: PyTree, mesh: Mesh) -> PyTree:
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda s: isinstance(s, PartitionSpec))


def place(tree: PyTree, mesh: Mesh) -> PyTree:
  """Puts host/device values (equal on every process) into the mesh layout of `state_specs`."""
  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(put, tree, shardings(state_specs(tree, mesh), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(value: Any, mesh: Mesh) -> jax.Array:
  """A global array holding `value` (equal on every process) on every device of the mesh."""
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, replicated(mesh), lambda index: host[index])


def replicate_tree(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host arrays (the same on every process) as arrays replicated over the mesh."""
  return jax.tree_util.tree_map(lambda x: replicate(x, mesh), tree)


def check_divides(rows: int, mesh: Mesh, what: str) -> None:
  """MeshError unless `rows` splits evenly over the mesh's devices."""
  n = mesh_size(mesh)
  if rows % n:
    raise MeshError(
        f"{what} = {rows} does not split evenly over the {n} devices of the mesh (data = "
        f"{mesh.shape['data']}, fsdp = {mesh.shape['fsdp']}); use a multiple of {n}.")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live: the mesh and the PartitionSpecs of params and optimizer state.

  Batches are split by rows over every device (`batch`); scalars are `replicated`.
  """
  mesh: Mesh
  params: PyTree
  opt_state: PyTree

  def sharding(self, specs: PyTree) -> PyTree:
    return shardings(specs, self.mesh)

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, BATCH_SPEC)

  @property
  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)


def make_layout(mesh: Mesh, params: PyTree, opt_state: PyTree = ()) -> Layout:
  return Layout(mesh, state_specs(params, mesh), state_specs(opt_state, mesh))


# ------------------------------------------------------------------------------------------------
# Batches, one slice per process


@functools.lru_cache(maxsize=64)  # called for every batch: the answer depends on the shape only
def process_rows(mesh: Mesh, rows: int) -> slice:
  """The contiguous rows of a `rows`-row batch that this process's devices hold."""
  check_divides(rows, mesh, "The batch size")
  index_map = NamedSharding(mesh, BATCH_SPEC).addressable_devices_indices_map((rows,))
  starts = sorted({index[0].start or 0 for index in index_map.values()})
  per_device = rows // mesh_size(mesh)
  if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
    raise MeshError("This process's devices do not hold a contiguous block of the batch; build the "
                    "mesh with dpjax.parallel.make_mesh.")
  return slice(starts[0], starts[0] + per_device * len(starts))


def global_batch(mesh: Mesh, local: PyTree, rows: int) -> PyTree:
  """Global arrays [rows, ...] split by rows over the mesh, from this process's `process_rows`."""
  sharding = NamedSharding(mesh, BATCH_SPEC)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                       (rows,) + np.shape(x)[1:]), local)


# ------------------------------------------------------------------------------------------------
# Sharded gradient sums


def _fsdp_dim(spec: PartitionSpec) -> int | None:
  return next((d for d, axis in enumerate(spec) if axis == "fsdp"), None)


def _full_params(params: PyTree, specs: PyTree) -> PyTree:
  """Inside shard_map: each leaf whole (gathered over 'fsdp') and device-varying over every axis.

  Device-varying, so that grad sums nothing across devices behind our back (DESIGN.md).
  """
  def full(p, spec):
    p = jax.lax.pcast(p, tuple(a for a in MESH_AXES if a not in spec), to="varying")
    d = _fsdp_dim(spec)
    return p if d is None else jax.lax.all_gather(p, "fsdp", axis=d, tiled=True)
  return jax.tree_util.tree_map(full, params, specs, is_leaf=_is_spec)


def _reduce(sums: PyTree, specs: PyTree) -> PyTree:
  """Inside shard_map: adds every device's full-shape sum, leaving it in the params' layout."""
  def reduce(s, spec):
    d = _fsdp_dim(spec)
    if d is None:
      return jax.lax.psum(s, MESH_AXES)
    return jax.lax.psum_scatter(jax.lax.psum(s, "data"), "fsdp", scatter_dimension=d, tiled=True)
  return jax.tree_util.tree_map(reduce, sums, specs, is_leaf=_is_spec)


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def sharded_gradient_sum(local_sum: Callable, mesh: Mesh, specs: PyTree,
                         reduce_aux: Callable[[Any], Any], partial: bool = False) -> Callable:
  """Wraps local_sum(params, *row_args) -> (sum over rows, aux) to run on a mesh.

  local_sum: computes a params-shaped sum over the rows it is given (e.g. the clipped per-example
    gradient sum) and auxiliary per-device values; it must treat rows independently.
  specs: the params' PartitionSpecs (`state_specs`); the returned sum is laid out the same way.
  reduce_aux: reduces aux across devices inside shard_map, e.g. `lambda a: psum(a, MESH_AXES)`.
  partial: if True the sums are not added across devices: each leaf comes back as
    [devices, *shape], one device's sum per row, split over the devices (`PARTIAL_SPEC`), for
    `reduce_partial_sums` to add once per step after many microbatches.
  Row arguments are split over every device (BATCH_SPEC); params enter in their own layout.
  """
  def per_device(params, *row_args):
    total, aux = local_sum(_full_params(params, specs), *row_args)
    if partial:
      return jax.tree_util.tree_map(lambda s: s[None], total), reduce_aux(aux)
    return _reduce(total, specs), reduce_aux(aux)

  out_sum_specs = PARTIAL_SPEC if partial else specs

  def wrapped(params, *row_args):
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(specs,) + (BATCH_SPEC,) * len(row_args),
                         out_specs=(out_sum_specs, P()))(params, *row_args)
  return wrapped


def reduce_partial_sums(partial_sums: PyTree, mesh: Mesh, specs: PyTree) -> PyTree:
  """Adds the per-device sums of `sharded_gradient_sum(partial=True)` into the params' layout."""
  return jax.shard_map(lambda sums: _reduce(jax.tree_util.tree_map(lambda s: s[0], sums), specs),
                       mesh=mesh, in_specs=(PARTIAL_SPEC,), out_specs=specs)(partial_sums)


# ------------------------------------------------------------------------------------------------
# Multi-host


def _detected_cluster() -> str | None:
  """How this process learns it is part of a multi-process job: 'forced' (DPJAX_DISTRIBUTED=1, as
  launch/tpu_pod.sh sets), 'slurm' (srun with more than one task), or None."""
  if os.environ.get("DPJAX_DISTRIBUTED", "") == "1":
    return "forced"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  return None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, cpu_collectives: str = "gloo") -> bool:
  """Starts jax.distributed when this is a multi-process job; returns whether it is.

  Explicit: coordinator_address ("host:port"), num_processes and process_id, as passed (the
  DPJAX_COORDINATOR_ADDRESS / DPJAX_NUM_PROCESSES / DPJAX_PROCESS_ID environment variables, set by
  launch/multiprocess.py, fill any that are unset). Otherwise, under SLURM with more than one task
  or with DPJAX_DISTRIBUTED=1 (Cloud TPU pods: launch/tpu_pod.sh), jax.distributed.initialize()
  detects the cluster itself; elsewhere nothing happens (one process). Must run before anything
  touches a jax backend. CPU processes use `cpu_collectives` ('gloo').
  """
  coordinator_address = coordinator_address or os.environ.get("DPJAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("DPJAX_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("DPJAX_PROCESS_ID", "-1"))
  cluster = _detected_cluster()
  if not coordinator_address and cluster is None:
    return False
  if jax.distributed.is_initialized():
    return True
  if cpu_collectives:  # used only by the CPU backend
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if coordinator_address:
    if num_processes <= 0 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"distributed.coordinator_address = {coordinator_address!r} needs "
          f"distributed.num_processes > 0 and 0 <= distributed.process_id < num_processes; got "
          f"{num_processes} and {process_id}.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()  # jax reads the SLURM environment / Cloud TPU metadata itself
  return True


def is_main_process() -> bool:
  """Process 0 writes metrics, results and prints; every process runs the same steps."""
  return jax.process_index() == 0


def check_same_config(config: dict) -> None:
  """ValueError on every process unless all processes were given the same config."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).digest()
  mine = np.frombuffer(digest[:16], np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    raise ValueError(
        f"Processes {differ} were given a different config from process 0 (this is process "
        f"{jax.process_index()}). Launch every process with the same --config and overrides.")


def local_copy(tree: PyTree) -> PyTree:
  """`tree` on this process's first device, for process-local work (public-data statistics, which
  every process then computes alike, without replicating the work over the mesh)."""
  if all(not isinstance(x, jax.Array) or x.is_fully_addressable
         for x in jax.tree_util.tree_leaves(tree)):
    return jax.device_put(tree, jax.local_devices()[0])
  return jax.device_put(to_host(tree), jax.local_devices()[0])


def to_host(tree: PyTree) -> PyTree:
  """NumPy copies of global arrays, gathered from every process where no process holds it all."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)
