"""orbax checkpoints of a whole run (docs/design.md principle 4), shared by the SFT and RL loops.

A checkpoint step holds three items:
  state  the TrainState pytree (params, optimizer state, step, RNG), restored straight onto its shardings;
  data   each host's data-iterator state (grain get_state), one JSON file per process;
  extra  a JSON dict for whatever else the loop needs to continue (RL: buffers, weight version, counters).

orbax writes a step into a temporary directory and renames it only once every item (and every host) is done, so a
save killed midway leaves a tmp directory that `latest_step` never returns: a resumed run starts from the newest
complete checkpoint (on gs:// orbax marks a finished step with a commit_success.txt file instead of renaming it).
Saves are async: the device arrays are copied to host before `save` returns, then written in
the background while training continues.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from qednano_jax import paths


# ----------------------------------------------------------------------------------------------- per-host JSON

class HostJsonHandler(ocp.CheckpointHandler):
    """One JSON file per process (a data iterator's state differs per host)."""

    def save(self, directory: epath.Path, args: "HostJsonSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "HostJsonRestore" = None):
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no data-iterator state for this process (was the run saved with a "
                                    "different number of hosts?)")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None


@ocp.args.register_with_handler(HostJsonHandler, for_save=True)
@dataclasses.dataclass
class HostJsonSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(HostJsonHandler, for_restore=True)
@dataclasses.dataclass
class HostJsonRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------- manager

class Checkpointer:
    """`CheckpointManager` over `directory` (local, or a URL such as gs://bucket/run/checkpoints) saving every `every`
    steps, keeping the newest `keep`."""

    def __init__(self, directory: str | Path | epath.Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = paths.resolve(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "extra"))

    def latest_step(self) -> int | None:
        """Newest complete (finalised) checkpoint step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state_tree: Any, *, data_state: Any = None, extra: dict | None = None,
             force: bool = False) -> bool:
        """Save if `step` is a multiple of `every` (or `force`); returns whether a save started."""
        if not force and step % self.every:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state_tree),
                                  data=HostJsonSave(data_state),
                                  extra=ocp.args.JsonSave(extra or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        """(state tree on the shardings of `abstract_state` (ShapeDtypeStructs with .sharding), data state, extra)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=HostJsonRestore(),
                                  extra=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state, out.data, dict(out.extra or {})

    def wait(self) -> None:
        """Block until the background save is finalised."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`, the target of a restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
