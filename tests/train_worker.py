"""One training step through `jaxmodels.train.step`, shared by tests/test_train.py (1 device, in process)
and this script's subprocess mode (8 simulated CPU devices; XLA_FLAGS is set before jax is imported).

    python tests/train_worker.py sharded OUT_DIR CKPT[,CKPT...] DATA.jsonl
        -> OUT_DIR/<family>-<mesh>.npz: the loss and the parameters after one SGD(lr=1) step on each mesh
           (so a difference in a parameter is a difference in its gradient), and
           OUT_DIR/batch3.json: `jaxmodels train` with a batch the 8-device mesh cannot split.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmodels  # noqa: E402
from jaxmodels import sharding  # noqa: E402
from jaxmodels.train import step as steplib  # noqa: E402

MESHES = {"fsdp=2,expert=2,tensor=2": dict(fsdp=2, expert=2, tensor=2), "fsdp=8": dict(fsdp=8)}


def flat(tree) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(tree)}


def one_step(path, batch, *, mesh=None, opts=steplib.StepOptions(), tx=None, compute_dtype=None, remat="none"):
    """Loads checkpoint `path` (float32 master weights), runs one jitted train_step on `batch`
    ({name: [micro-batches, rows, seq]}) with `tx` (default SGD with lr 1: new params = params - grads).
    Returns (state before, state after, metrics) on the host."""
    model = jaxmodels.from_pretrained(path, jnp.float32, mesh=mesh, progress=False)
    model = model.with_options(compute_dtype=compute_dtype, remat=remat)
    graphdef, params, frozen, buffers = steplib.split_model(model)
    tx = tx or optax.sgd(1.0)
    state = steplib.init_state(params, buffers, tx, mesh)
    before = jax.device_get(state)
    if mesh is not None:
        batch = sharding.shard_batch(batch, mesh, micro=True)
    new, metrics = jax.jit(functools.partial(steplib.train_step, graphdef, tx, opts))(state, frozen, batch)
    return before, jax.device_get(new), jax.device_get(metrics)


def sharded(out_dir, ckpts, data):
    import json
    import contextlib
    import io

    from jaxmodels import cli, sharding
    from jaxmodels.train.data import TrainData

    for path in ckpts.split(","):
        rows = TrainData.from_jsonl(data, path, seq_len=16, progress=False).batch(0, 8)
        batch = {k: v[None] for k, v in rows.items()}
        family = os.path.basename(path).split("-")[0]
        opts = steplib.StepOptions(bias_update_rate=1e-2 if family == "deepseek_v3" else 0.0)
        for name, sizes in MESHES.items():
            mesh = sharding.make_mesh(**sizes)
            _, new, metrics = one_step(path, batch, mesh=mesh, opts=opts)
            np.savez(os.path.join(out_dir, f"{family}-{name}.npz"), loss=metrics["loss"],
                     **{"params." + k: v for k, v in flat(new["params"]).items()},
                     **{"buffers." + k: v for k, v in flat(new["buffers"]).items()})

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["train", "--model", ckpts.split(",")[0], "--data", data, "--out", os.path.join(out_dir, "b3"),
                       "--steps", "2", "--batch-size", "3", "--seq-len", "16", "--quiet"])
    with open(os.path.join(out_dir, "batch3.json"), "w") as f:
        json.dump({"rc": rc, "stderr": err.getvalue()}, f)


if __name__ == "__main__":
    assert sys.argv[1] == "sharded", sys.argv
    assert jax.device_count() == 8
    sharded(*sys.argv[2:])
