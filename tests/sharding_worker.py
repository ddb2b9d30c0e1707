"""Runs in a subprocess with simulated CPU devices (XLA_FLAGS is set before jax is imported).

    python tests/sharding_worker.py forward FAMILY CKPT OUT.json      # 8 devices: meshes vs 1 device
    python tests/sharding_worker.py mtp CKPT OUT.json                 # 8 devices: MTP loss + speculative vs 1
    python tests/sharding_worker.py memory OUT.json                   # 8 devices: peak host memory of loading
    python tests/sharding_worker.py multihost PROC PORT CKPT OUT.npy  # 4 devices per process, 2 processes
    python tests/sharding_worker.py vocab OUT.json                    # 8 devices: lookup / vocab-parallel CE
    python tests/sharding_worker.py moe_chunks OUT.json               # 8 devices: chunked expert parallelism

Each mode writes its measurements to OUT; the pytest side (test_sharding.py, test_multihost.py) asserts.
"""

from __future__ import annotations

import json
import os
import sys

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=4" if MODE == "multihost" else
    " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmodels  # noqa: E402
from jaxmodels import sharding  # noqa: E402
from jaxmodels.layers.mtp import num_mtp_layers  # noqa: E402
from mesh_batch import batch  # noqa: E402  (tests/ is this script's directory)

MESHES = {
    "data=8": dict(data=8),
    "fsdp=2,expert=2,tensor=2": dict(fsdp=2, expert=2, tensor=2),
    "expert=4,tensor=2": dict(expert=4, tensor=2),
    "fsdp=8": dict(fsdp=8),
}
GENERATE_MESHES = ("fsdp=2,expert=2,tensor=2",)  # every axis at once; compiling generate is the slow part


def forward_fn(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, attention_mask=m).logits)
    return f, state


def check_params(model, mesh) -> dict:
    """Every parameter's sharding is the table's; expert weights are split by the expert axis."""
    bad, experts = [], {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        arr = var.get_value()
        want = sharding.param_spec(var, mesh)
        got = arr.sharding.spec
        if tuple(got) + (None,) * (arr.ndim - len(got)) != tuple(want) + (None,) * (arr.ndim - len(want)):
            bad.append(f"{name}: {got} != {want}")
        local = sharding.shard_shape(arr.shape, want, mesh)
        for shard in arr.addressable_shards:
            if tuple(shard.data.shape) != tuple(local):
                bad.append(f"{name}: shard {shard.data.shape} != {local}")
        if "experts" in sharding.var_axes(var):
            ax = sharding.var_axes(var).index("experts")
            per_device = {}
            for shard in arr.addressable_shards:
                idx = shard.index[ax]
                per_device.setdefault(shard.device.id, set()).update(range(*idx.indices(arr.shape[ax])))
            experts[name] = {"total": arr.shape[ax], "max_per_device": max(len(v) for v in per_device.values()),
                             "spec": str(want)}
    return {"bad": bad, "experts": experts}


def fsdp_gathers(hlo: str, model) -> dict:
    """FSDP: weights are all-gathered per layer inside the scan, never as whole stacks."""
    stacked = set()
    for _, var in nnx.to_flat_state(nnx.state(model)):
        axes = sharding.var_axes(var)
        if axes and axes[0] == "layers" and var.shape[0] > 1:
            stacked.add(tuple(var.shape))
    in_body = whole = 0
    for line in hlo.splitlines():
        if " all-gather(" not in line:
            continue
        shape = line.split("=", 1)[1].strip().split("{")[0].split("[", 1)[1].split("]")[0]
        dims = tuple(int(d) for d in shape.split(",") if d)
        if "while/body" in line:
            in_body += 1
        if dims in stacked:
            whole += 1
    return {"in_body": in_body, "whole_stack": whole}


def forward(family: str, ckpt: str, out: str) -> None:
    base = jaxmodels.from_pretrained(ckpt, progress=False)
    ids, mask = batch(base.config.vocab_size)
    f, state = forward_fn(base)
    ref = np.asarray(f(state, jnp.asarray(ids), jnp.asarray(mask)))
    from jaxmodels.generate import generate, prefill

    ref_gen = np.asarray(generate(base, ids, mask, max_new_tokens=3))
    results = {"devices": jax.device_count(), "meshes": {}}
    for label, axes in MESHES.items():
        mesh = sharding.make_mesh(**axes)
        model = jaxmodels.from_pretrained(ckpt, progress=False, mesh=mesh)
        f, state = forward_fn(model)
        sids, smask = sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh)
        compiled = f.lower(state, sids, smask).compile()
        logits = compiled(state, sids, smask)
        err = float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max())
        r = {"rel_err": err, "params": check_params(model, mesh), "logits_spec": str(logits.sharding.spec),
             "ids_spec": str(sids.sharding.spec)}
        # `jaxmodels plan` (shapes only) against the bytes the devices really hold.
        from jaxmodels.plan import make_plan
        plan = make_plan(base.config, axes, batch=0, seq=0, dtype=jnp.float32, mtp_layers=num_mtp_layers(base))
        held = {}
        for _, var in nnx.to_flat_state(nnx.state(model)):
            for shard in var.get_value().addressable_shards:
                held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
        r["plan_param_bytes"], r["held_param_bytes"] = plan.params, max(held.values())
        if label == "fsdp=8":
            r["fsdp"] = fsdp_gathers(compiled.as_text(), model)
        if label in GENERATE_MESHES:
            r["generate_equal"] = bool((np.asarray(generate(model, sids, smask, max_new_tokens=3)) == ref_gen).all())
            if num_mtp_layers(model):  # MTP self-speculative greedy on the mesh == plain greedy on one device
                spec = generate(model, sids, smask, max_new_tokens=3, speculative=True)
                r["speculative_equal"] = bool((np.asarray(spec) == ref_gen).all())
            _, cache, _, _ = prefill(model, sids, smask)
            r["cache_specs"] = {f"{stack}.{k}": str(getattr(c, k).sharding.spec) for stack, c in cache.items()
                                for k in sharding.CACHE_AXES if hasattr(c, k)}
        results["meshes"][label] = r
    if getattr(base.config, "is_moe", False):
        # The decode-sized path of the expert-parallel MoE (gather the chosen local experts), forced for all.
        mesh = sharding.make_mesh(expert=4, tensor=2)
        model = jaxmodels.from_pretrained(ckpt, progress=False, mesh=mesh, options={"gather_max_slots": 1 << 30})
        f, state = forward_fn(model)
        logits = f(state, sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh))
        results["gather_path_rel_err"] = float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max())
    # The rules table is the user's: batch not split over `expert` -> the MoE takes its psum-only path.
    if not getattr(base.config, "is_moe", False):
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
        return
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    rules = {"batch": ("data", "fsdp")}
    model = jaxmodels.from_pretrained(ckpt, progress=False, mesh=mesh, rules=rules)
    f, state = forward_fn(model)
    logits = f(state, sharding.shard_batch(ids, mesh, rules), sharding.shard_batch(mask, mesh, rules))
    results["override_rules"] = {
        "rel_err": float(np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()),
        "params": check_params(model, mesh)}
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)


def memory(out: str) -> None:
    """Peak host memory (tracemalloc: numpy buffers and Python objects, not device buffers) while loading a
    checkpoint much larger than one tensor onto a mesh."""
    import gc
    import math
    import tempfile
    import tracemalloc

    from jaxmodels.convert import loader
    from jaxmodels.convert.reader import Checkpoint
    from jaxmodels.config import DeepseekV2Config

    cfg = DeepseekV2Config(
        vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=1024, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, max_position_embeddings=64)
    tmp = tempfile.mkdtemp()
    model = jaxmodels.CausalLM(cfg, rngs=nnx.Rngs(0))
    jaxmodels.save_pretrained(model, tmp, progress=False)
    del model
    gc.collect()
    ckpt = Checkpoint(tmp)
    sizes = [math.prod(ckpt.shape(k)) * 4 for k in ckpt.keys()]
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    # A window far below the checkpoint (the defaults are sized for real models), pieces smaller still, so
    # several are in flight at once and the bound is what the window promises.
    loader.LOAD_WINDOW_BYTES, loader.PIECE_BYTES = 4 << 20, 1 << 20
    results = {"checkpoint_bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "num_tensors": len(sizes),
               "host_block_bytes": loader.LOAD_WINDOW_BYTES}
    for label, kw in (("mesh", dict(mesh=mesh)),):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        loaded = jaxmodels.from_pretrained(tmp, progress=False, **kw)
        jax.block_until_ready(nnx.state(loaded))
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        results[label + "_peak"] = peak
        gate = loaded.model.moe_layers.layers.mlp.experts.gate_up_proj.get_value()
        results[label + "_expert_shard"] = list(gate.addressable_shards[0].data.shape)
        del loaded, gate
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)


def multihost(proc: int, port: int, ckpt: str, out: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=proc)
    from jax.experimental import multihost_utils

    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    model = jaxmodels.from_pretrained(ckpt, progress=False, mesh=mesh)
    ids, mask = batch(model.config.vocab_size)
    f, state = forward_fn(model)
    logits = f(state, sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh))
    full = multihost_utils.process_allgather(logits, tiled=True)
    gate = model.model.moe_layers.layers.mlp.experts.gate_up_proj.get_value()
    info = {"process_count": jax.process_count(), "local_devices": jax.local_device_count(),
            "global_devices": jax.device_count(), "addressable_expert_shards": len(gate.addressable_shards),
            "expert_shard": list(gate.addressable_shards[0].data.shape)}
    if proc == 0:
        np.save(out, np.asarray(full))
        with open(out + ".json", "w") as fh:
            json.dump(info, fh)
    multihost_utils.sync_global_devices("done")


def mtp(ckpt: str, out: str) -> None:
    """DeepSeek-V3 with an MTP layer: the MTP loss terms and speculative decoding on meshes against one device,
    and whether the MTP layer's MoE runs expert-parallel (a shard_map in the MTP forward's program)."""
    from jaxmodels.generate import generate
    from jaxmodels.layers.mtp import mtp_hidden
    from jaxmodels.train.loss import mtp_loss_terms

    def measure(model, ids, mask):
        graphdef, state = nnx.split(model)

        def terms(st, i, m):
            md = nnx.merge(graphdef, st)
            h = md.hidden(i, m)
            return jnp.asarray([list(t) for t in mtp_loss_terms(md, h, {"input_ids": i, "attention_mask": m})],
                               jnp.float32)  # [depths, (sum, count, right)]

        def mtp_forward(st, h, i, m):
            return mtp_hidden(nnx.merge(graphdef, st), h, i, attention_mask=m)

        h = jax.jit(lambda st, i, m: nnx.merge(graphdef, st).hidden(i, m))(state, ids, mask)
        jaxpr = str(jax.make_jaxpr(mtp_forward)(state, h, ids, mask))
        spec, stats = generate(model, ids, mask, max_new_tokens=4, speculative=True, return_stats=True)
        return {"terms": np.asarray(jax.jit(terms)(state, ids, mask)).tolist(), "shard_maps": jaxpr.count("shard_map"),
                "speculative": np.asarray(spec).tolist(), "accepted": stats["accepted"]}

    base = jaxmodels.from_pretrained(ckpt, progress=False)
    ids, mask = batch(base.config.vocab_size)
    results = {"devices": jax.device_count(), "one": measure(base, jnp.asarray(ids), jnp.asarray(mask)),
               "plain": np.asarray(generate(base, ids, mask, max_new_tokens=4)).tolist(), "meshes": {}}
    for label in ("expert=4,tensor=2", "fsdp=2,expert=2,tensor=2"):
        mesh = sharding.make_mesh(**MESHES[label])
        model = jaxmodels.from_pretrained(ckpt, progress=False, mesh=mesh)
        results["meshes"][label] = measure(model, sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh))
    with open(out, "w") as fh:
        json.dump(results, fh)


def vocab(out: str) -> None:
    """jaxmodels.layers.vocab's lookup and vocabulary-parallel cross-entropy (values and gradients) on meshes
    against the single-device code."""
    from jaxmodels.layers import vocab as vocab_lib
    from jaxmodels.options import Options
    v, d, b, c, ignore = 64, 16, 8, 6, -100
    k = jax.random.split(jax.random.key(0), 4)
    table = jax.random.normal(k[0], (v, d), jnp.float32)
    ids = jax.random.randint(k[1], (b, c), 0, v)
    h = jax.random.normal(k[2], (b, c, d), jnp.float32)
    targets = jnp.where(jax.random.uniform(k[3], (b, c)) < 0.2, ignore, ids)
    targets = targets.at[0, 0].set(v - 1)  # a target in the last device's slice
    h = h.at[1, 1].set(0.0)  # all logits equal: argmax is index 0 on every path

    def run(options):
        def f(table, h):
            emb = vocab_lib.lookup(table, ids, jnp.float32, options)
            loss, n, right = vocab_lib.cross_entropy(h + emb, table, targets, ignore, options)
            return loss, (emb, n, right)
        (loss, (emb, n, right)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(table, h)
        return [np.asarray(x).tolist() for x in (loss, emb, n, right, *grads)]

    want = run(Options())
    res = {}
    for name, sizes in MESHES.items():
        mesh = sharding.make_mesh(**sizes)
        options = Options(mesh=mesh)
        res[name] = dict(got=run(options), axes=list(vocab_lib.sharded_head(options, b, v)))
    with open(out, "w") as f:
        json.dump(dict(want=want, meshes=res), f)


def moe_chunks(out: str) -> None:
    """Expert parallelism in chunks (each chunk of tokens gathered over the expert group, computed, reduce-
    scattered: jaxmodels.layers.moe.chunked_experts) against one pass on one device, values and gradients."""
    from jaxmodels.layers import moe
    from jaxmodels.options import Options
    t, d, e, inter, k = 32, 8, 8, 6, 2
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (t, d), jnp.float32)
    ids = jax.random.randint(keys[1], (t, k), 0, e)
    w = jax.nn.softmax(jax.random.normal(keys[2], (t, k)), axis=-1)
    gate_up = jax.random.normal(keys[3], (e, 2, inter, d), jnp.float32) / 3
    down = jax.random.normal(keys[4], (e, inter, d), jnp.float32) / 3

    def run(options, fn):
        def f(x, gate_up, down):
            return jnp.sum(jnp.sin(fn(x, ids, w, gate_up, down, "silu", options)))
        val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, gate_up, down)
        return [np.asarray(a).tolist() for a in (val, *grads)]

    want = run(Options(), moe.grouped_experts)
    moe.MAX_SLOTS_PER_CHUNK = 16  # 32 tokens x 2 slots gathered over 2-4 devices: 8-16 chunks
    res = {}
    for name in ("fsdp=2,expert=2,tensor=2", "expert=4,tensor=2", "fsdp=8"):
        mesh = sharding.make_mesh(**MESHES[name])
        res[name] = run(Options(mesh=mesh), moe.expert_parallel)
    with open(out, "w") as f:
        json.dump(dict(want=want, meshes=res), f)


if __name__ == "__main__":
    if MODE == "moe_chunks":
        moe_chunks(sys.argv[2])
    elif MODE == "vocab":
        vocab(sys.argv[2])
    elif MODE == "forward":
        forward(sys.argv[2], sys.argv[3], sys.argv[4])
    elif MODE == "mtp":
        mtp(sys.argv[2], sys.argv[3])
    elif MODE == "memory":
        memory(sys.argv[2])
    elif MODE == "multihost":
        multihost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {MODE}")
