"""`jaxmodels train` in one process of a simulated pod (tests/test_pod.py): N simulated CPU devices (XLA_FLAGS is
set before jax is imported), then `jaxmodels.cli.main(["train", ...])` exactly as a user runs it.

    python tests/pod_worker.py DEVICES REPORT_DIR STOP_AT train --model ... [--coordinator ... --process-id I]

REPORT_DIR/rows-<process>.json: the rows of the first micro-batch this process read (its share of the batch).
STOP_AT > 0: before optimizer step STOP_AT + 1 the process waits for its checkpoints to be on disk, writes
REPORT_DIR/stopped-<process> and blocks; the test then SIGKILLs it (a host lost mid-run, between checkpoints).
"""

from __future__ import annotations

import json
import os
import sys
import time

DEVICES, REPORT, STOP_AT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxmodels import cli  # noqa: E402
from jaxmodels.train.data import TrainData  # noqa: E402
from jaxmodels.train.loop import Trainer  # noqa: E402

_batch, _step = TrainData.batch, Trainer.step


def batch(self, index, batch_size, shard=None):
    out = _batch(self, index, batch_size, shard)
    path = os.path.join(REPORT, f"rows-{jax.process_index()}.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump({"batch_size": batch_size, "rows": int(out["input_ids"].shape[0]),
                       "shard": None if shard is None else [shard.shard_index, shard.shard_count],
                       "input_ids": out["input_ids"].tolist(), "index": index}, f)
    return out


def step(self):
    if STOP_AT and self.step_count == STOP_AT:
        self.checkpoints.wait()
        open(os.path.join(REPORT, f"stopped-{jax.process_index()}"), "w").close()
        time.sleep(3600)
    return _step(self)


TrainData.batch, Trainer.step = batch, step

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[4:]))
