"""Logical axis names -> mesh axes (docs/design.md principle 1).

The model names every parameter and activation axis logically (`vocab`, `embed`, `heads`, ..., and `act_*` for
activations). A rule set maps each logical name to a mesh axis (`data`, `fsdp`, `tensor`, `sequence`), a tuple of mesh
axes, or None (replicated). Strategies (dp, fsdp, tp, fsdp+tp, and the sequence-parallel fsdp_sp, fsdp_tp_sp) are
rule sets, not code paths.

Resolution of one array's logical axes: each axis takes its rule's mesh axes unless one of them is already used by
an earlier axis of the same array, or the dimension is not divisible by the mesh size of those axes; then that axis
is replicated. So a rule set written for the 4B model also serves a tiny model with 2 KV heads on 4 tensor shards.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Mapping[str, Any]  # logical name -> None | "axis" | ("axis", "axis")

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("qednano_rules", default=None)


def _as_tuple(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array with logical `axes` under `rules` on `mesh` (see module doc for the fallbacks)."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = tuple(a for a in _as_tuple(rules.get(name) if name else None) if mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in target) if target else 1
        if not target or used & set(target) or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used |= set(target)
        out.append(target[0] if len(target) == 1 else target)
    return P(*out)


def named_sharding(axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def tree_shardings(axes_tree: Any, rules: Rules, mesh: Mesh, shapes_tree: Any = None) -> Any:
    """NamedShardings for a pytree of logical-axes tuples (leaves are tuples), optionally with matching shapes."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    if shapes_tree is None:
        return jax.tree.map(lambda a: named_sharding(a, rules, mesh), axes_tree, is_leaf=is_axes)
    return jax.tree.map(lambda a, s: named_sharding(a, rules, mesh, getattr(s, "shape", s)),
                        axes_tree, shapes_tree, is_leaf=is_axes)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Within this context, `constrain` places activations on `mesh` by `rules` (outside it, it is a no-op)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op without active rules."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, rules, mesh, x.shape))


def active_axes(logical: str) -> tuple[Mesh | None, tuple[str, ...]]:
    """(mesh, the mesh axes of size > 1 that the active rules map `logical` to); (None, ()) without active rules."""
    active = _ACTIVE.get()
    if active is None:
        return None, ()
    mesh, rules = active
    return mesh, tuple(a for a in _as_tuple(rules.get(logical)) if mesh.shape.get(a, 1) > 1)


def active_spec(axes: Sequence[str | None], shape: Sequence[int]) -> P:
    """PartitionSpec of an activation with logical `axes` under the active rules (P() without)."""
    active = _ACTIVE.get()
    return P() if active is None else logical_to_spec(axes, active[1], active[0], shape)


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh with named axes; one size may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    names = list(shape)
    sizes = [int(shape[n]) for n in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by the fixed axes {dict(shape)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: axes {dict(zip(names, sizes))} need {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


# ----------------------------------------------------------------------------------------------- rule sets
# One table per strategy (docs/design.md principle 1); configs/mesh/<name>.yaml holds the same tables with mesh sizes
# (tests/train/test_sharding_rules.py keeps the two in step). `batch` is the data's leading axis; `act_*` are the
# model's activation axes. A name missing from a table is replicated.

_BATCH = ("data", "fsdp")  # the batch is split over every data-parallel axis (fsdp shards params, not data, only)

RULE_SETS: dict[str, dict[str, Any]] = {
    # plain data parallelism: replicated params, batch over `data`
    "dp": {"batch": _BATCH, "act_batch": _BATCH},
    # ZeRO-3 style: params and optimizer state split over `fsdp` on their embed axis (vocab for the embedding)
    "fsdp": {"batch": _BATCH, "act_batch": _BATCH, "vocab": "fsdp", "embed": "fsdp", "mlp": "fsdp"},
    # Megatron-style tensor parallelism: heads and mlp over `tensor`, the vocab of the embedding / LM head too
    "tp": {"batch": _BATCH, "act_batch": _BATCH, "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor",
           "mlp": "tensor", "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor",
           "act_vocab": "tensor"},
    # both: embed over `fsdp`, heads / mlp / vocab over `tensor`
    "fsdp_tp": {"batch": _BATCH, "act_batch": _BATCH, "vocab": "tensor", "embed": "fsdp", "heads": "tensor",
                "kv_heads": "tensor", "mlp": "tensor", "act_heads": "tensor", "act_kv_heads": "tensor",
                "act_mlp": "tensor", "act_vocab": "tensor"},
}

# sequence parallelism: the activations' length axis over `sequence` (model.attention.sequence_parallel), the params
# sharded over fsdp x sequence (every device holds 1/n of them), rows over the data-parallel axes only
_FSDP_SP = ["fsdp", "sequence"]
RULE_SETS["fsdp_sp"] = {"batch": _BATCH, "act_batch": _BATCH, "vocab": _FSDP_SP, "embed": _FSDP_SP, "mlp": _FSDP_SP,
                        "act_length": "sequence"}
RULE_SETS["fsdp_tp_sp"] = {**RULE_SETS["fsdp_tp"], "embed": _FSDP_SP, "act_length": "sequence"}

MESH_SHAPES: dict[str, dict[str, int]] = {
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "tp": {"data": 1, "fsdp": 1, "tensor": -1},
    "fsdp_tp": {"data": 1, "fsdp": -1, "tensor": 2},
    "fsdp_sp": {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 2},
    "fsdp_tp_sp": {"data": 1, "fsdp": -1, "tensor": 2, "sequence": 2},
}


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, batch_dim: int = 0,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a data array whose `batch_dim` axis is the (per-micro-batch) batch; other axes replicated.
    With `shape`, a batch that does not divide over the batch axes is replicated (e.g. the 1-row CPU demo)."""
    axes = [None] * ndim
    axes[batch_dim] = "batch"
    return named_sharding(axes, rules, mesh, shape)


# ----------------------------------------------------------------------------------------------- multi-host

def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when the environment describes a multi-process run (docs/design.md scale
    targets: multi-controller JAX, one process per host). Recognised: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES
    + JAX_PROCESS_ID (explicit), or a Cloud TPU pod / SLURM / Open MPI environment that jax detects on its own
    (TPU_WORKER_HOSTNAMES with several hosts, SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1). Returns whether it
    initialised. Must run before any other jax call touches devices."""
    import os
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
        return True
    auto = (len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
            or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if auto:
        jax.distributed.initialize()
        return True
    return False


def host_to_global(local: Any, shardings: Any) -> Any:
    """Assemble per-host numpy arrays (this host's rows of the global batch) into global jax Arrays.

    Each process feeds its own contiguous block of rows along the sharded batch axis
    (`jax.make_array_from_process_local_data`); on one host this is a plain device_put.
    """
    if jax.process_count() == 1:
        return jax.device_put(local, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local, shardings)
