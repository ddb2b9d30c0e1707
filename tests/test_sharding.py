"""Meshes, the rules table, expert parallelism, loading onto a mesh and `jaxmodels plan`.

The multi-device tests run tests/sharding_worker.py in a subprocess with 8 simulated CPU devices
(XLA_FLAGS must be set before jax is imported; this pytest process keeps its single device).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxmodels
from jaxmodels import sharding
from jaxmodels.plan import PRESETS, make_plan
from tiny import make_checkpoint, random_batch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_worker(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

def test_default_rules_table():
    spec = sharding.logical_to_spec
    fsdp = ("fsdp", "expert")  # FSDP over every axis the batch splits over but data
    assert spec(("layers", "experts", "expert_embed", "moe_mlp")) == P(None, "expert", "fsdp", "tensor")
    assert spec(("vocab", "embed")) == P("tensor", fsdp)
    assert spec(("heads", "embed")) == P("tensor", fsdp)
    assert spec(("embed", "kv_heads")) == P(fsdp, "tensor")
    assert spec(("layers", "heads", "kv_lora")) == P(None, "tensor", fsdp)
    assert spec(sharding.ACTIVATION_AXES) == P(("data", "fsdp", "expert"))
    assert spec(sharding.CACHE_AXES["latent"]) == P(None, ("data", "fsdp", "expert"))
    assert spec(sharding.CACHE_AXES["kv"]) == P(None, ("data", "fsdp", "expert"), None, None, "tensor")


def test_a_mesh_axis_used_twice_is_an_error():
    with pytest.raises(sharding.ShardingError, match="twice"):
        sharding.logical_to_spec(("embed", "heads"), rules={"heads": "fsdp"})
    with pytest.raises(sharding.ShardingError, match="twice"):
        sharding.logical_to_spec(("batch", "embed"))  # batch uses fsdp, so does embed
    with pytest.raises(sharding.ShardingError, match="not in the sharding rules"):
        sharding.logical_to_spec(("no_such_axis",))


def test_rules_are_overridable_and_axes_that_do_not_divide_are_dropped():
    assert sharding.logical_to_spec(("heads", "embed"), rules={"embed": None}) == P("tensor")
    assert sharding.logical_to_spec(("heads", "embed"), rules={"heads": ("tensor", "data")}) == \
        P(("tensor", "data"), ("fsdp", "expert"))
    assert sharding.logical_to_spec(("heads", "embed"), rules={"embed": "fsdp"}) == P("tensor", "fsdp")
    mesh = {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    # A batch of 2 on data=2 x fsdp=4: only `data` divides it.
    assert sharding.logical_to_spec(("batch", None), mesh=mesh, shape=(2, 5)) == P("data")
    assert sharding.logical_to_spec(("batch", None), mesh=mesh, shape=(8, 5)) == P(("data", "fsdp", "expert"))


def test_make_mesh_sizes():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert dict(sharding.make_mesh(fsdp=-1).shape)["fsdp"] == jax.device_count()
    with pytest.raises(sharding.ShardingError, match="needs"):
        sharding.make_mesh(data=2 * jax.device_count())
    with pytest.raises(sharding.ShardingError, match="only one"):
        sharding.make_mesh(data=-1, fsdp=-1)
    assert sharding.parse_mesh("fsdp=64, expert=8") == {"fsdp": 64, "expert": 8}
    with pytest.raises(sharding.ShardingError):
        sharding.parse_mesh("pipeline=2")
    assert jaxmodels.make_mesh is sharding.make_mesh


def test_one_device_mesh_is_just_the_special_case(tmp_path):
    """mesh= on 1 device runs the same code as 8 (shard_map MoE, constraints) and gives the same logits."""
    path, hf = make_checkpoint(tmp_path, "deepseek_v3")
    ids, mask = random_batch(hf.config.vocab_size, pad_left=2)
    plain = jaxmodels.from_pretrained(path, progress=False)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    mesh = sharding.make_mesh()
    model = jaxmodels.from_pretrained(path, progress=False, mesh=mesh)
    assert model.options.mesh is mesh
    out = model(sharding.shard_batch(ids, mesh), attention_mask=sharding.shard_batch(mask, mesh))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(plain.logits), rtol=1e-5, atol=1e-5)
    # shard_model / init_model put an existing or a fresh model on the mesh by the same table.
    fresh = jaxmodels.init_model(model.config, mesh, seed=1)
    w = fresh.model.moe_layers.layers.mlp.experts.gate_up_proj.get_value()
    assert w.sharding.spec == P(None, "expert", None, "tensor", "fsdp")  # [layers, E, gate/up, inter, hidden]


# ---------------------------------------------------------------------------------------------------
# 8 simulated devices
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a subprocess with several devices
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "stablelm"])
def test_sharded_forward_and_generate_equal_single_device(tmp_path, family):
    path, _ = make_checkpoint(tmp_path, family)
    if family == "deepseek_v3":  # with an MTP layer: speculative decoding on the mesh is checked too
        from test_convert import read_tensors, write_checkpoint
        from test_mtp import mtp_tensors
        tensors = read_tensors(path)
        path = write_checkpoint(path, tmp_path / "with-mtp", {**tensors, **mtp_tensors(tensors)})
    out = tmp_path / "result.json"
    run_worker("forward", family, path, out)
    r = json.loads(out.read_text())
    assert r["devices"] == 8
    assert set(r["meshes"]) == {"data=8", "fsdp=2,expert=2,tensor=2", "expert=4,tensor=2", "fsdp=8"}
    for label, m in r["meshes"].items():
        assert m["rel_err"] < 1e-5, (label, m["rel_err"])
        assert m["params"]["bad"] == [], (label, m["params"]["bad"][:5])  # every parameter placed by the table
        assert m["plan_param_bytes"] == m["held_param_bytes"], label  # `plan` predicts what devices hold
        if "expert=" in label:  # no device holds all experts
            for name, e in m["params"]["experts"].items():
                want = e["total"] // (4 if "expert=4" in label else 2)
                assert e["max_per_device"] == want, (label, name, e)
        assert m["ids_spec"].startswith("P(("), label  # the batch itself is split
    assert "fsdp" in r["meshes"]["fsdp=2,expert=2,tensor=2"]["logits_spec"]
    # FSDP: stacked weights are all-gathered one layer at a time inside the scan, never whole.
    fsdp = r["meshes"]["fsdp=8"]["fsdp"]
    assert fsdp["in_body"] > 0 and fsdp["whole_stack"] == 0, fsdp
    full = r["meshes"]["fsdp=2,expert=2,tensor=2"]
    assert full["generate_equal"]  # greedy tokens identical on the mesh; the static cache split like the batch
    if family == "deepseek_v3":
        assert full["speculative_equal"]  # MTP self-speculative greedy on the mesh == plain greedy
    assert full["cache_specs"] and all("fsdp" in s and "expert" in s for s in full["cache_specs"].values()), \
        full["cache_specs"]
    if family != "stablelm":  # rules overridden: batch not split over `expert` (the MoE's psum-only path)
        assert r["gather_path_rel_err"] < 1e-5  # and the decode-sized gather path, forced for every size
        assert r["override_rules"]["rel_err"] < 1e-5
        assert r["override_rules"]["params"]["bad"] == []


@pytest.mark.slow
def test_mtp_loss_and_speculative_decoding_on_a_mesh_equal_one_device(tmp_path):
    """The MTP forward runs on the model's mesh like every layer: its loss terms and speculative decoding on 8
    devices equal one device's, and its MoE takes the expert-parallel path (a shard_map in the MTP program;
    none on one device)."""
    from test_convert import read_tensors, write_checkpoint
    from test_mtp import mtp_tensors

    path, _ = make_checkpoint(tmp_path, "deepseek_v3")
    tensors = read_tensors(path)
    path = write_checkpoint(path, tmp_path / "with-mtp", {**tensors, **mtp_tensors(tensors)})
    out = tmp_path / "mtp.json"
    run_worker("mtp", path, out)
    r = json.loads(out.read_text())
    one = r["one"]
    assert r["devices"] == 8 and one["shard_maps"] == 0
    assert np.asarray(one["terms"])[:, 1].min() > 0  # targets were counted
    assert one["speculative"] == r["plain"]  # speculative greedy == plain greedy
    for label, m in r["meshes"].items():
        assert m["shard_maps"] >= 1, label  # the MTP layer's MoE is expert-parallel on the mesh
        np.testing.assert_allclose(m["terms"], one["terms"], rtol=1e-5, err_msg=label)
        assert m["speculative"] == one["speculative"] and m["accepted"] == one["accepted"], label


@pytest.mark.slow  # a subprocess with several devices
def test_loading_onto_a_mesh_keeps_host_memory_near_one_tensor(tmp_path):
    out = tmp_path / "memory.json"
    run_worker("memory", out)
    r = json.loads(out.read_text())
    bound = r["host_block_bytes"] + 3 * r["largest_tensor_bytes"]
    assert r["checkpoint_bytes"] > 20 * bound, r  # the test is meaningful: the checkpoint dwarfs the bound
    assert r["mesh_peak"] < bound, r
    assert r["mesh_expert_shard"] == [3, 8, 2, 512, 128], r  # 3 MoE layers; 16 experts / 2; gate, up; 1024 / 2; 256 / 2


# ---------------------------------------------------------------------------------------------------
# jaxmodels plan
# ---------------------------------------------------------------------------------------------------

def test_plan_full_deepseek_v3_on_256_chips():
    cfg = PRESETS["deepseek-v3"]
    plan = make_plan(cfg, {"fsdp": 32, "expert": 8}, batch=8, seq=4096)
    assert 670e9 < plan.num_params < 672e9  # DeepSeek-V3's 671B (the MTP layer is not part of the model)
    # Routed experts alone: 58 MoE layers x 256 experts x 3 matrices, split 8 (expert) x 32 (fsdp) ways.
    experts = 58 * 256 * 3 * 7168 * 2048 * 2 // 256
    assert experts < plan.params < experts + 12 * 2**30
    assert plan.params < 2.5 * plan.num_params * 2 / 256  # within 2.5x of a perfect split (q_b_proj: see RULES)
    assert abs(plan.optimizer - 4 * plan.gradients) < 1e-3 * plan.optimizer  # fp32 mu + nu vs bf16 grads
    # MLA cache: (kv_lora 512 + rope 64) per token per layer; batch 8 cannot split 256 ways -> replicated.
    assert plan.cache == 61 * 8 * 4096 * 576 * 2
    assert make_plan(cfg, {"fsdp": 32, "expert": 8}, batch=256, seq=4096).cache == 61 * 4096 * 576 * 2
    one = make_plan(cfg, {}, batch=1, seq=4096)
    assert one.params > 1.3e12  # all 671B in bf16 on one device


def test_plan_cli(capsys, tmp_path):
    from jaxmodels.cli import main

    assert main(["plan", "--model", "deepseek-v3", "--mesh", "fsdp=32,expert=8", "--batch", "8", "--seq", "4096",
                 "--device-memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert "671.03B parameters" in text and "256 devices" in text and "inference  fits" in text
    assert main(["plan", "--model", "deepseek-v3", "--device-memory", "80GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    path, _ = make_checkpoint(tmp_path, "stablelm")
    assert main(["plan", "--model", path, "--mesh", "tensor=2", "--dtype", "float32"]) == 0
    assert "stablelm" in capsys.readouterr().out
    assert main(["plan", "--model", "no-such-model"]) == 2


def test_lazy_slices_follow_the_key_map_transforms(tmp_path, monkeypatch):
    """Loading onto a mesh reads a device's block through the layout transform (fused gate_up, transposes);
    a transform the lazy view cannot follow falls back to the whole tensor, with the same result."""
    from safetensors.numpy import save_file

    from jaxmodels.convert import loader
    from jaxmodels.convert.keymap import Placement, _transpose
    from jaxmodels.convert.reader import Checkpoint

    rng = np.random.default_rng(0)
    fused = rng.standard_normal((4, 2 * 6, 10)).astype(np.float32)  # [E, 2 * inter, hidden]
    save_file({"fused": fused, "plain": fused[0]}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(str(tmp_path))
    cases = [
        (Placement(("p",), (), lambda x: _transpose(x[:, :6])), "fused", True),  # gate half, [E, hidden, inter]
        (Placement(("p",), (), lambda x: _transpose(x[:, 6:])), "fused", True),  # up half
        (Placement(("p",), (), _transpose), "plain", True),
        (Placement(("p",), (), None), "plain", True),
        (Placement(("p",), (), lambda x: np.flip(x, 0)), "plain", False),  # not lazily expressible: falls back
    ]
    whole_reads = []
    real_read = loader.read_tensor
    monkeypatch.setattr(loader, "read_tensor", lambda c, k: whole_reads.append(k) or real_read(c, k))

    def read_block(key, pl, box):
        """The loader's own path for one piece: plan it, fill its host buffer, apply its device-side layout."""
        piece = loader._make_piece(ckpt, [(key, pl)], box, 0, 4)
        buf = np.empty(piece.host_shape, np.float32)
        loader._fill(ckpt, buf, piece.parts)
        return buf.transpose(piece.axes) if piece.axes is not None else buf

    for pl, key, lazy in cases:
        full = pl.transform(ckpt.get(key)) if pl.transform else ckpt.get(key)
        whole_reads.clear()
        for box in [tuple((0, n) for n in full.shape), tuple((n // 2, n) for n in full.shape),
                    tuple((1, max(2, n - 1)) for n in full.shape)]:
            index = tuple(slice(a, b) for a, b in box)
            np.testing.assert_array_equal(read_block(key, pl, box), full[index])
        assert (whole_reads == []) == lazy, (key, whole_reads)  # lazy cases never read the whole tensor


@pytest.mark.slow
def test_vocab_lookup_and_cross_entropy_on_meshes_equal_one_device(tmp_path):
    """jaxmodels.layers.vocab: the embedding lookup (ids gathered, one all-to-all) and the vocabulary-parallel
    cross-entropy (loss, counts, argmax hits, gradients of table and hidden states) on 8 devices == 1 device."""
    out = tmp_path / "vocab.json"
    run_worker("vocab", str(out))
    res = json.loads(out.read_text())
    want = res["want"]
    for name, m in res["meshes"].items():
        assert m["axes"], name  # the vocabulary-parallel path ran (the batch is split on every mesh here)
        loss, emb, n, right, d_table, d_h = m["got"]
        assert (n, right) == (want[2], want[3]), name
        np.testing.assert_allclose(loss, want[0], rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(emb, want[1], err_msg=name)
        np.testing.assert_allclose(d_table, want[4], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(d_h, want[5], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_expert_parallel_in_chunks_equals_one_pass_on_one_device(tmp_path):
    """Above MAX_SLOTS_PER_CHUNK slots the expert-parallel MoE gathers, computes and reduce-scatters one chunk of
    tokens at a time (2 and 4 chunks here): value and gradients (tokens, both expert weights) == one device."""
    out = tmp_path / "moe.json"
    run_worker("moe_chunks", str(out))
    res = json.loads(out.read_text())
    for name, got in res["meshes"].items():
        for a, b, what in zip(got, res["want"], ("value", "d_x", "d_gate_up", "d_down")):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} {what}")
