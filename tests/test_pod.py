"""Training on several hosts (jaxmodels.distributed): the multi-process flags and environment, each process's
share of a batch, the mesh across slices / nodes, and `jaxmodels train` as 2 processes of 4 simulated CPU devices
(a local coordinator, gloo collectives) equal to 1 process of 8 devices, through a save, a SIGKILL and a resume.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from jaxmodels import cli, distributed
from jaxmodels.distributed import DistributedError, DistributedOptions, parse_options
from jaxmodels.train.data import TrainData
from tiny import WORDS, add_word_tokenizer, make_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEQ = 16


# ---------------------------------------------------------------------------------------------------
# Flags and environment
# ---------------------------------------------------------------------------------------------------

def test_flags_and_environment():
    # No flags, no environment: a single-process run.
    assert parse_options(env={}) == DistributedOptions() and not parse_options(env={}).enabled
    # Flags.
    o = parse_options("10.0.0.2:8476", "4", "3", env={})
    assert o == DistributedOptions("10.0.0.2:8476", 4, 3) and o.enabled
    # JAX_* variables fill what the flags leave; flags win.
    env = {"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert parse_options(env=env) == DistributedOptions("host0:1234", 2, 1)
    assert parse_options(process_id=0, env=env) == DistributedOptions("host0:1234", 2, 0)
    assert parse_options("other:99", env=env).coordinator == "other:99"
    # One process: nothing to coordinate.
    assert not parse_options("localhost:1234", 1, 0, env={}).enabled
    # --distributed, or a cluster jax detects: jax fills what is not given.
    assert parse_options(auto=True, env={}) == DistributedOptions(auto=True)
    for cluster in ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {"OMPI_COMM_WORLD_SIZE": "2"},
                    {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {"MEGASCALE_COORDINATOR_ADDRESS": "w0"}):
        assert distributed.detected_cluster(cluster) and parse_options(env=cluster).auto, cluster
    for single in ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, {"OMPI_COMM_WORLD_SIZE": "1"},
                   {"TPU_WORKER_HOSTNAMES": "w0"}):
        assert distributed.detected_cluster(single) is None and not parse_options(env=single).enabled, single


@pytest.mark.parametrize("kw, words", [
    (dict(coordinator="nohost"), ["--coordinator", "HOST:PORT"]),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), ["--coordinator", "HOST:PORT"]),
    (dict(coordinator="h:1234"), ["--num-processes", "--process-id"]),
    (dict(num_processes=2, process_id=1), ["--coordinator", "--distributed"]),
    (dict(process_id=0), ["--coordinator"]),
    (dict(coordinator="h:1234", num_processes=2, process_id=2), ["--process-id 2", "0..1"]),
    (dict(coordinator="h:1234", num_processes=0, process_id=0), ["--num-processes", ">= 1"]),
    (dict(coordinator="h:1234", num_processes="two", process_id=0), ["--num-processes", "integer"]),
])
def test_bad_settings_name_the_flag(kw, words):
    with pytest.raises(DistributedError) as e:
        parse_options(env={}, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_environment_names_the_variable():
    with pytest.raises(DistributedError, match="JAX_PROCESS_ID"):
        parse_options(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"})


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "x.jsonl").write_text('{"text": "the cat"}\n')
    base = ["train", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o"),
            "--steps", "1", "--quiet"]
    for extra, words in ((["--num-processes", "2", "--process-id", "1"], "--coordinator"),
                         (["--coordinator", "localhost:1234"], "--num-processes")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxmodels train: error:") and words in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------
# Each process's share of a batch
# ---------------------------------------------------------------------------------------------------

class _ProcessView:
    """What `batch_shard` reads of a sharding: the index of each of this process's devices into the array."""

    def __init__(self, rows: list[tuple[int, int]]):
        self.rows = rows

    def addressable_devices_indices_map(self, shape):
        return {d: (slice(None), slice(lo, hi)) + (slice(None),) * (len(shape) - 2)
                for d, (lo, hi) in enumerate(self.rows)}


def test_batch_shard_from_the_devices_rows():
    shard = distributed.batch_shard(_ProcessView([(8, 10), (10, 12), (12, 14), (14, 16)]), (2, 16, 5), 1)
    assert (shard.shard_index, shard.shard_count) == (1, 2)  # rows 8..15 of 16
    shard = distributed.batch_shard(_ProcessView([(4, 6), (4, 6), (6, 8), (6, 8)]), (1, 16), 1)  # tensor-replicated
    assert (shard.shard_index, shard.shard_count) == (1, 4)
    shard = distributed.batch_shard(_ProcessView([(0, 16)] * 4), (1, 16), 1)  # batch replicated over processes
    assert (shard.shard_index, shard.shard_count) == (0, 1)
    # Rows that are not one aligned block: read the whole batch (make_array_from_process_local_data picks).
    assert isinstance(distributed.batch_shard(_ProcessView([(0, 2), (8, 10)]), (1, 16), 1),
                      grain.sharding.NoSharding)
    # A real one-process sharding: all rows.
    import jax
    from jaxmodels import sharding
    from jaxmodels.train import step as steplib
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    shard = steplib.process_shard(mesh, 8, micro=True)
    assert (shard.shard_index, shard.shard_count) == (0, 1)


def test_data_shards_are_the_batch_rows(tmp_path):
    ckpt = add_word_tokenizer(make_checkpoint(tmp_path, "stablelm")[0])
    data = TrainData.from_jsonl(_write_data(tmp_path / "train.jsonl"), ckpt, seq_len=SEQ, progress=False)
    per_epoch = data.batches_per_epoch(8)
    for index in (0, 3, per_epoch + 1):  # a later epoch too (reshuffled)
        full = data.batch(index, 8)
        for count in (2, 4):
            parts = [data.batch(index, 8, grain.sharding.ShardOptions(i, count)) for i in range(count)]
            for name in full:
                assert all(p[name].shape[0] == 8 // count for p in parts)
                np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), full[name])
    # One process: ShardByJaxProcess is shard 0 of 1, the whole batch.
    whole = data.batch(2, 8, grain.sharding.ShardByJaxProcess())
    np.testing.assert_array_equal(whole["input_ids"], data.batch(2, 8)["input_ids"])
    from jaxmodels.train.data import DataError
    with pytest.raises(DataError, match="multiple of 3"):
        data.batch(0, 8, grain.sharding.ShardOptions(0, 3))


# ---------------------------------------------------------------------------------------------------
# The mesh across slices / nodes
# ---------------------------------------------------------------------------------------------------

def test_dcn_mesh_counts_processes():
    from jaxmodels.train.config import TrainError
    from jaxmodels.train.loop import build_mesh

    mesh = build_mesh("fsdp=1", "data=1")  # one process, one granule
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    with pytest.raises(TrainError, match="spans 2 processes, but the run has 1"):
        build_mesh(None, "data=2")
    with pytest.raises(TrainError, match="unknown mesh axis 'pipeline'"):
        build_mesh(None, "pipeline=2")


# ---------------------------------------------------------------------------------------------------
# 2 processes x 4 devices == 1 process x 8 devices: `jaxmodels train`, a save, a SIGKILL, a resume
# ---------------------------------------------------------------------------------------------------

def _write_data(path, n=60, seed=0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS[:40], rng.integers(3, 20)))}) + "\n")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(devices: int, report: str, stop_at: int, argv: list[str]) -> subprocess.Popen:
    os.makedirs(report, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    # Less LLVM optimisation of the CPU programs (the same for every run compared): ~25% less compile time.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    log = open(os.path.join(report, f"log-{len(os.listdir(report))}.txt"), "w")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "pod_worker.py"), str(devices), report, str(stop_at),
                             *argv], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _logs(report: str) -> str:
    out = []
    for name in sorted(os.listdir(report)):
        if name.startswith("log-"):
            with open(os.path.join(report, name)) as f:
                out.append(name + ":\n" + "\n".join(line for line in f.read().splitlines()
                                                    if "Gloo" not in line and "Involuntary" not in line)[-3000:])
    return "\n".join(out)


def _pod(report: str, stop_at: int, argv: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    return [_launch(4, report, stop_at, argv + ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                                "--process-id", str(i)]) for i in range(2)]


def _wait(procs, report, timeout=900):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), _logs(report)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _final_params(out):
    from flax import nnx

    from jaxmodels.train.export import load_run
    from train_worker import flat
    model, step, _ = load_run(str(out))
    return step, flat(nnx.state(model))  # parameters and buffers (DeepSeek-V3's routing bias)


@pytest.mark.slow
def test_two_processes_train_equal_one_process(tmp_path):
    ckpt = add_word_tokenizer(make_checkpoint(tmp_path, "deepseek_v3")[0])
    data = _write_data(tmp_path / "train.jsonl")
    steps, stop_at = 6, 3
    argv = ["train", "--model", ckpt, "--data", data, "--steps", str(steps), "--batch-size", "8", "--seq-len",
            str(SEQ), "--lr", "1e-2", "--warmup", "1", "--log-every", "1", "--save-every", "2", "--dtype", "float32",
            "--bias-update-rate", "1e-2", "--quiet"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    rep = {k: str(tmp_path / f"report-{k}") for k in ("ref", "killed", "resumed")}
    # The reference (1 process, 8 devices: data x fsdp x expert = 2 x 2 x 2) and the pod (2 processes = 2 "hosts"
    # across the data-center network, each 4 devices: fsdp x expert = 2 x 2 inside) run at the same time.
    ref_proc = _launch(8, rep["ref"], 0, argv + ["--out", ref, "--mesh", "data=2,fsdp=2,expert=2"])
    pod_argv = argv + ["--out", run, "--mesh", "fsdp=2,expert=2", "--dcn-mesh", "data=2"]
    procs = _pod(rep["killed"], stop_at, pod_argv)
    try:
        # Both processes stop before step stop_at + 1 (checkpoint 2 on disk, step 3 done, not saved): kill both.
        end = time.time() + 900
        while not all(os.path.exists(os.path.join(rep["killed"], f"stopped-{i}")) for i in range(2)):
            assert all(p.poll() is None for p in procs), _logs(rep["killed"])
            assert time.time() < end, "the pod run did not reach step 3"
            time.sleep(0.5)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]
    from jaxmodels.train.checkpoint import Checkpoints
    c = Checkpoints(run, read_only=True)
    assert c.all_steps() == [2]
    c.close()

    # Each process read only its half of the batch: rows 0-3 and 4-7 of the reference's batch.
    shares = [json.load(open(os.path.join(rep["killed"], f"rows-{i}.json"))) for i in range(2)]
    _wait([ref_proc], rep["ref"])
    whole = json.load(open(os.path.join(rep["ref"], "rows-0.json")))
    assert whole["rows"] == 8 and whole["shard"] == [0, 1]
    assert [(s["rows"], s["shard"]) for s in shares] == [(4, [0, 2]), (4, [1, 2])]
    assert shares[0]["input_ids"] + shares[1]["input_ids"] == whole["input_ids"]

    # Resume on a fresh pair of processes (a new coordinator port): from checkpoint 2, steps 3..6.
    _wait(_pod(rep["resumed"], 0, pod_argv + ["--resume"]), rep["resumed"])

    a, b = _metrics(ref), _metrics(run)
    assert [m["step"] for m in b] == list(range(1, steps + 1))  # each step once: process 0 alone writes
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in b], [m["grad_norm"] for m in a], rtol=1e-4)
    np.testing.assert_allclose([m["expert_load"] for m in b], [m["expert_load"] for m in a], atol=1e-6)
    sa, pa = _final_params(ref)
    sb, pb = _final_params(run)
    assert sa == sb == steps and set(pa) == set(pb) and any("e_score_correction_bias" in k for k in pa)
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-4, atol=1e-6, err_msg=k)
