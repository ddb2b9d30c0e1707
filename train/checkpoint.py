"""Training checkpoints with Orbax's `CheckpointManager`: complete or absent, never half-written.

A checkpoint of step N is a directory `<out>/checkpoints/N/` with the items
* `params`    -- the trainable parameters (all of them, or only the LoRA adapters);
* `buffers`   -- non-trained state that changes during training (DeepSeek-V3's routing bias);
* `opt_state` -- the optimizer state;
* `meta`      -- JSON: step, data position (micro-batches consumed), RNG seed, and the run's identity
                 (model, data fingerprint, LoRA settings) that `--resume` checks.
Orbax writes each save into a temporary directory and renames it into place once every item is finished,
so a run killed during a save leaves the previous checkpoints intact and the partial one is ignored (and
cleaned up) on the next start. Saves are asynchronous: training continues while the arrays are written.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from jaxmodels.train.config import TrainError

log = logging.getLogger("jaxmodels.train")

ITEMS = ("params", "buffers", "opt_state", "meta")


class _QuietReadOnly(logging.Filter):
    """Orbax announces every read-only manager (`export` opens one) with an absl warning: noise to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


class Checkpoints:
    """The checkpoints of one run directory (`<out>/checkpoints`)."""

    def __init__(self, out_dir: str, *, keep: int = 3, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(out_dir, "checkpoints"))
        # Orbax cleans old temporary directories in a background thread that `close()` does not wait for; with
        # nothing to clean, that thread would only race a failed start removing the empty folder it lists.
        leftovers = not read_only and os.path.isdir(self.directory) and bool(os.listdir(self.directory))
        # (read only: no max_to_keep / save interval, which Orbax would otherwise reset with a warning each)
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep,
                                               save_interval_steps=0 if read_only else 1, create=not read_only,
                                               read_only=read_only, cleanup_tmp_directories=leftovers,
                                               enable_async_checkpointing=True,
                                               # Multi-host: every process writes its own arrays' shards;
                                               # process 0 writes the metadata and commits the step.
                                               multiprocessing_options=ocp.options.MultiprocessingOptions(
                                                   primary_host=0))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts an asynchronous save of `state` ({"params", "buffers", "opt_state", ...}) and `meta`."""
        # Orbax refuses an empty tree (StableLM has no buffers; plain SGD no optimizer state): such an item is
        # not written, and `restore` gives back the (equally empty) target.
        trees = {k: ocp.args.StandardSave(state[k]) for k in ("params", "buffers", "opt_state")
                 if jax.tree.leaves(state[k])}
        self.manager.save(step, args=ocp.args.Composite(**trees, meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: dict, items=("params", "buffers", "opt_state")) -> dict:
        """The saved `items` of `step`, placed like the arrays of `target` (same tree, any devices)."""
        def abstract(tree):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

        args = {k: ocp.args.StandardRestore(abstract(target[k])) for k in items if jax.tree.leaves(target[k])}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise TrainError(f"checkpoint {self.directory}/{step} cannot be restored into this model ({e}); it was "
                             "written by a different model or LoRA setting") from None
        return {k: out[k] if k in args else target[k] for k in items}

    def wait(self) -> None:
        """Blocks until the last asynchronous save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save, then stops the manager's threads (idempotent)."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None
