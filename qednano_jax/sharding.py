"""Logical axis names -> mesh axes (DESIGN.md principle 1).

The model names every parameter and activation axis logically (`vocab`, `embed`, `heads`, ..., and `act_*` for
activations). A rule set maps each logical name to a mesh axis (`data`, `fsdp`, `tensor`), a tuple of mesh axes,
or None (replicated). Strategies (dp, fsdp, tp, fsdp+tp) are rule sets, not code paths.

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
