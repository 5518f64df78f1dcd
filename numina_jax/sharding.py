"""The one place where sharding is decided: the mesh, and the rules mapping logical axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and optimizer state),
`expert` (experts split across devices; also carries batch outside the MoE), `tensor` (heads, expert
intermediate and vocab split across devices).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "experts": "expert",
    "experts_router": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_vocab": "tensor",
}


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, expert, tensor) mesh; one entry may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(s) for s in shape]
    if len(dims) != len(MESH_AXES):
      raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {dims}")
  if dims.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, dims))}")
  known = int(np.prod([d for d in dims if d != -1]))
  if any(d == 0 or d < -1 for d in dims):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, dims))}")
  if -1 in dims:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes "
                       f"{dict(zip(MESH_AXES, dims))}")
    dims[dims.index(-1)] = len(devices) // known
  if int(np.prod(dims)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, "
                     f"but {len(devices)} are available")
  return Mesh(_device_array(dims, devices), MESH_AXES)


def _device_array(dims: list[int], devices: list[jax.Device]) -> np.ndarray:
  """Devices laid out so that each mesh axis follows the TPU's physical torus where it can. A mesh axis that
  no whole physical axis matches (tensor 2 on a 4x4x4 slice) splits a physical axis: neighbours along it are
  still ICI neighbours, which is what `allow_split_physical_axes` permits. Off TPU, `mesh_utils` orders
  devices as given (CPU) or by its own GPU rules. (mesh_utils reports a layout it cannot make with
  NotImplementedError, ValueError or a failed assert.)"""
  try:
    return mesh_utils.create_device_mesh(dims, devices)
  except (NotImplementedError, ValueError, AssertionError):
    pass
  try:
    return mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
  except (NotImplementedError, ValueError, AssertionError) as e:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} cannot be laid out on the {len(devices)} "
                     f"{devices[0].device_kind} devices' torus ({e}); choose mesh axis sizes that are products "
                     f"of the slice's physical axes (config.mesh.*)") from None


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, object] | None = None,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for `logical_axes`. With `mesh` and `shape`, an axis whose size does not divide by its mesh
  axes (or a mesh axis already used) stays replicated, so any config runs on any mesh: a deliberate choice
  (8 KV heads on tensor 16 is a valid model), and for parameters a logged one (`param_shardings` warns once
  per parameter and mesh, and `numina_jax.plan`'s memory figures, compiled with these shardings, include the copies)."""
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    target = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = []
    for a in axes:
      if a in used:
        continue
      size = mesh.shape[a] if mesh is not None else 1
      if mesh is not None and shape is not None:
        done = int(np.prod([mesh.shape[k] for k in keep])) if keep else 1
        if shape[i] % (done * size):
          continue
      if mesh is not None and size == 1:
        continue
      keep.append(a)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Mapping[str, object] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))


def param_shardings(specs: Mapping[str, object], mesh: Mesh, rules=None) -> dict[str, NamedSharding]:
  """NamedSharding for every parameter of a `param_specs` table; a parameter that stays (partly) replicated
  because its size does not divide the mesh is logged once."""
  out = {}
  for k, s in specs.items():
    out[k] = named_sharding(mesh, s.logical_axes, s.shape, rules)
    wanted = logical_to_spec(s.logical_axes, rules, mesh)
    if out[k].spec != wanted and (k, tuple(mesh.shape.items())) not in _WARNED:
      _WARNED.add((k, tuple(mesh.shape.items())))
      logging.getLogger("numina_jax").warning(
          "parameter %s %s: logical axes %s want %s on mesh %s but the sizes do not divide; sharded as %s "
          "(the rest replicated)", k, tuple(s.shape), tuple(s.logical_axes), wanted, dict(mesh.shape),
          out[k].spec)
  return out


_WARNED: set = set()


def opt_state_shardings(tx, params_abstract, p_shardings, mesh: Mesh):
  """Optimizer moments follow their parameter's sharding; everything else (counts, scalars) is replicated."""
  abstract = jax.eval_shape(tx.init, params_abstract)
  rep = NamedSharding(mesh, P())

  def pick(path, leaf):
    for entry in reversed(path):
      key = getattr(entry, "key", None)
      if isinstance(key, str) and key in p_shardings and tuple(leaf.shape) == tuple(params_abstract[key].shape):
        return p_shardings[key]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None], rules=None) -> jax.Array:
  """Sharding constraint on an activation, a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not mesh.shape:
    return x
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)
