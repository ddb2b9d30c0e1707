"""Two processes on localhost (4 simulated CPU devices each, gloo collectives) run one sharded forward."""

import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from mesh_batch import batch
from tiny import make_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a subprocess with several devices
def test_two_process_sharded_forward_equals_single_device(tmp_path):
    path, _ = make_checkpoint(tmp_path, "deepseek_v3")
    out = str(tmp_path / "logits.npy")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sharding_worker.py"), "multihost", str(i),
                               str(port), path, out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-4000:] for e in errs)
    info = json.load(open(out + ".json"))
    # 8 devices across 2 processes; each process holds (and loaded) only its 4 devices' shards.
    assert info == {"process_count": 2, "local_devices": 4, "global_devices": 8, "addressable_expert_shards": 4,
                    "expert_shard": [2, 4, 2, 8, 16]}, info
    ids, mask = batch(96)
    ref = jaxmodels.from_pretrained(path, progress=False)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    got = np.load(out)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
