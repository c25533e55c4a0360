"""Meshes, logical axis rules and batch sharding.

One code path for every parallelism: the mesh always has the axes
(data, fsdp, tensor, expert); pure data parallelism, FSDP (ZeRO-3) and
FSDP + tensor parallelism differ only in the axis sizes of the config. Model
parameters carry logical axis names (nn.with_logical_partitioning) that the
rules below map to mesh axes; a rule for an axis of size 1 is a no-op.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The batch is split over every axis that does not split the model's math.
BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("expert", "expert"),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves axis sizes (-1 = the rest) for `num_devices` devices."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh has unknown axes {unknown}; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(sizes)}")
  if any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {dict(sizes)}")
  fixed = math.prod(s for s in shape if s != -1)
  if num_devices % fixed:
    raise ValueError(f"mesh {dict(sizes)} does not divide the {num_devices} "
                     f"devices")
  if free:
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses "
                     f"{math.prod(shape)} devices, but {num_devices} are "
                     f"present; use -1 for one axis to take the rest")
  return tuple(shape)


def create_mesh(sizes: Mapping[str, int], devices: Sequence | None = None,
                dcn: Mapping[str, int] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor, expert) mesh from the config.

  Args:
    sizes: axis -> size within a slice (ICI); -1 = the rest.
    devices: defaults to all devices of all hosts.
    dcn: axis -> number of slices along it (multi-slice TPU); the product must
      equal the number of slices. Omitted or all 1: a single slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn_shape = tuple(int((dcn or {}).get(a, 1)) for a in MESH_AXES)
  slices = math.prod(dcn_shape)
  if slices > 1:
    ici_shape = mesh_shape(sizes, len(devices) // slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    shape = mesh_shape(sizes, len(devices))
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Rules as a tuple of (logical, mesh axes) pairs; None = DEFAULT_RULES."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def logical_to_sharding(logical_tree, mesh: Mesh, rules) -> Any:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  missing = set()

  def check(spec):
    for name in spec:
      names = name if isinstance(name, tuple) else (name,)
      for n in names:
        if n is not None and n not in dict(rules):
          missing.add(n)
    return spec

  jax.tree.map(check, logical_tree, is_leaf=lambda x: isinstance(x, P))
  if missing:
    raise ValueError(f"logical axes {sorted(missing)} have no rule in "
                     f"axis_rules; rules cover {[r[0] for r in rules]}")
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over BATCH_AXES."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def maybe_initialize_distributed() -> None:
  """Calls jax.distributed.initialize() on multi-host jobs.

  Cloud TPU pods and SLURM/Open MPI GPU clusters are detected by JAX itself;
  JDIT_COORDINATOR / JDIT_NUM_PROCESSES / JDIT_PROCESS_ID set them by hand.
  """
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get("JDIT_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JDIT_COORDINATOR"],
        num_processes=int(os.environ["JDIT_NUM_PROCESSES"]),
        process_id=int(os.environ["JDIT_PROCESS_ID"]))
  elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES",
                                     "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
    try:
      jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:
      # Single-host TPU VMs also set TPU_WORKER_HOSTNAMES; initialize()
      # refuses there, and one process is what we want.
      if "already" not in str(e) and jax.process_count() > 1:
        raise


def context_mesh():
  """The mesh set by `jax.set_mesh` (or a legacy `with mesh:`), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    return mesh
  try:  # `with mesh:` (deprecated) does not set the abstract mesh.
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    physical = mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical
  except (ImportError, AttributeError):
    return None


def axis_size(mesh, name: str) -> int:
  """Size of mesh axis `name`; 1 without a mesh or without that axis."""
  return int(mesh.shape[name]) if mesh is not None and name in (
      mesh.axis_names) else 1


def is_explicit(mesh) -> bool:
  """Whether `mesh` has Explicit axes (jax.make_mesh's default)."""
  return any(t == jax.sharding.AxisType.Explicit
             for t in getattr(mesh, "axis_types", ()))


def shard_map_call(fn, args: tuple, in_specs: tuple, out_specs, mesh,
                   check_vma: bool = True):
  """fn(*args) under jax.shard_map, on Auto- and Explicit-axis meshes.

  check_vma=False is for bodies without collectives whose primitives carry
  no varying-axes rules (pallas_call outputs).
  """
  if is_explicit(mesh):
    # Explicit-axis meshes (jax.make_mesh's default) do not reshard at the
    # shard_map boundary by themselves.
    args = jax.tree.map(jax.sharding.reshard, args, in_specs,
                        is_leaf=lambda a: isinstance(a, P))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=check_vma)(*args)


class use_mesh:  # pylint: disable=invalid-name
  """Context: `mesh` is the current mesh and `rules` the logical axis rules.

  Inside it, jax.jit places computations on the mesh and the models'
  nn.with_logical_constraint annotations become sharding constraints.
  """

  def __init__(self, mesh: Mesh, rules=None):
    self.mesh = mesh
    self.rules = rules_from_config(rules)
    self._stack = []

  def __enter__(self):
    for ctx in (jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)):
      ctx.__enter__()
      self._stack.append(ctx)
    return self.mesh

  def __exit__(self, *exc):
    while self._stack:
      self._stack.pop().__exit__(*exc)
    return False
