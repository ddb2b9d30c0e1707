"""The converter: HF safetensors (single, sharded, fused experts, FP8, MTP layers) -> jaxmodels -> HF again.

transformers is the oracle: every checkpoint here is written by its save_pretrained (or rewritten from
one with safetensors), and every export is read back by its from_pretrained.
"""

import hashlib
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxmodels.convert.export
import jaxmodels.convert.loader
import jaxmodels
from jaxmodels.convert.fp8 import dequantize_fp8
from jaxmodels.convert.hf import INDEX_FILE, convert_checkpoint
from jaxmodels.units import parse_size
from jaxmodels.convert.keymap import CheckpointError
from jaxmodels.config import ConfigError
from tiny import HEAD_CLASSES, add_word_tokenizer, hf_logits, make_checkpoint, make_hf_model, max_rel_err, random_batch

TOL = 1e-4  # float32 parity, relative to max |logit|
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


# ----------------------------------------------------------------------------------------------- helpers
_JITTED = {}


def logits(model, ids, mask):
    """The model's logits, jitted once per model structure (eager calls are slow on 2 CPU cores)."""
    graphdef, state = nnx.split(model)
    fn = _JITTED.get(graphdef)
    if fn is None:
        fn = _JITTED[graphdef] = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).logits)
    return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        assert np.array_equal(pa[k], pb[k]), k


def load(path, **kw):
    return jaxmodels.from_pretrained(os.fspath(path), progress=False, **kw)


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or shards)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def write_checkpoint(src, dst, tensors, config_changes=None):
    """A copy of checkpoint `src`'s config.json (with changes) and `tensors` as one model.safetensors."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_changes or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return os.fspath(dst)


def fuse_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert keys -> transformers' fused `mlp.experts.gate_up_proj` [E, 2*inter, hidden] (gate rows
    first, as its `.chunk(2)` reads them) and `mlp.experts.down_proj` [E, hidden, inter]."""
    tensors = dict(tensors)
    per_expert = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups = {}
    for key in list(tensors):
        if (m := per_expert.match(key)):
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = tensors.pop(key)
    assert groups, "the checkpoint should have per-expert keys"
    for prefix, g in groups.items():
        n = len(g["gate_proj"])
        tensors[f"{prefix}.gate_up_proj"] = np.stack(
            [np.concatenate([g["gate_proj"][e], g["up_proj"][e]], axis=0) for e in range(n)])
        tensors[f"{prefix}.down_proj"] = np.stack([g["down_proj"][e] for e in range(n)])
    return tensors


def dir_digest(path) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


def quantize_fp8(w: np.ndarray, block: int = 128):
    """DeepSeek's block quantisation: per 128x128 block, scale = amax / 448 (stored as weight_scale_inv,
    the dequantisation multiplier) and q = w / scale in float8_e4m3fn."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = np.zeros((rows * block, cols * block), np.float32)
    padded[: w.shape[0], : w.shape[1]] = w
    blocks = padded.reshape(rows, block, cols, block)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(rows * block, cols * block)[: w.shape[0], : w.shape[1]]
    return q.astype(FP8), scale.astype(np.float32)


def dequantize_reference(q: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """An independent reference: an explicit loop over blocks."""
    out = np.empty(q.shape, np.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rs, cs] = q[rs, cs].astype(np.float32) * np.float32(scale[i, j])
    return out


def is_fp8_weight(key: str, x: np.ndarray) -> bool:
    """The tensors DeepSeek-V3's official checkpoint stores in FP8: every linear weight in the layers
    except the router (embeddings, lm_head, norms, router and its bias stay high precision)."""
    return (key.startswith("model.layers.") and key.endswith("_proj.weight") and x.ndim == 2)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One tiny transformers checkpoint per family: {family: (path, hf_model)}."""
    root = tmp_path_factory.mktemp("hf")
    return {f: make_checkpoint(root, f) for f in ("deepseek_v2", "deepseek_v3", "stablelm")}


@pytest.fixture(scope="module")
def batch():
    return random_batch(96, pad_left=2)


@pytest.fixture(scope="module")
def v3_model(ckpts):
    return load(ckpts["deepseek_v3"][0])


# ----------------------------------------------------------------------------------------------- loading
def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("5GiB") == 5 * 2**30
    assert parse_size("20KB") == 20_000 and parse_size("1.5MB") == 1_500_000 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs", "max_shard_size")


def test_sharded_checkpoint_with_index(tmp_path, ckpts, batch, v3_model):
    """transformers' own sharded save (model.safetensors.index.json + several shards) loads to the
    same parameters as the single file, and the same logits as transformers."""
    _, hf = ckpts["deepseek_v3"]
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="40KB")
    shards = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    assert (path / INDEX_FILE).exists() and len(shards) >= 3, shards
    model = load(path)
    assert_same_params(model, v3_model)
    ids, mask = batch
    err = max_rel_err(logits(model, ids, mask), hf_logits(hf, ids, mask), mask)
    print(f"sharded ({len(shards)} shards) max rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_fused_expert_tensors(tmp_path, ckpts, batch, v3_model, family):
    """transformers' in-memory layout (`mlp.experts.gate_up_proj` [E, 2*inter, hidden], gate first;
    `mlp.experts.down_proj` [E, hidden, inter]) loads to exactly the per-expert parameters."""
    src, hf = ckpts[family]
    tensors = fuse_experts(read_tensors(src))
    for e in range(hf.config.num_hidden_layers):
        if f"model.layers.{e}.mlp.experts.gate_up_proj" in tensors:
            assert tensors[f"model.layers.{e}.mlp.experts.gate_up_proj"].shape == (
                hf.config.n_routed_experts, 2 * hf.config.moe_intermediate_size, hf.config.hidden_size)
    fused_path = write_checkpoint(src, tmp_path / "fused", tensors)
    fused = load(fused_path)
    reference = v3_model if family == "deepseek_v3" else load(src)
    assert_same_params(fused, reference)
    # The streaming converter cuts the same per-expert tensors from the fused ones.
    back = read_tensors(convert_checkpoint(fused_path, tmp_path / "unfused", progress=False))
    original = read_tensors(src)
    assert sorted(back) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], err_msg=k)
    ids, mask = batch
    err = max_rel_err(logits(fused, ids, mask), hf_logits(hf, ids, mask), mask)
    print(f"{family} fused experts max rel err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("shape", [(128, 256), (300, 200), (7, 129), (1, 1)])
def test_dequantize_fp8_matches_reference(shape):
    """Block b of the weight is multiplied by scale_inv[b], including partial edge blocks; scales that
    differ by powers of two per block catch a transposed or shifted scale grid."""
    rng = np.random.default_rng(0)
    rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
    q = rng.normal(0, 100, size=shape).clip(-448, 448).astype(FP8)
    scale = (2.0 ** rng.integers(-8, 8, size=(rows, cols)) * rng.uniform(0.5, 1.5, size=(rows, cols))).astype(
        np.float32)
    got = dequantize_fp8(q, scale)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, dequantize_reference(q, scale))
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        dequantize_fp8(q, np.ones((rows + 1, cols), np.float32))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """A tiny DeepSeek-V3 with dims > 128 (so weights span several, partial, 128x128 blocks), quantised
    the way DeepSeek ships V3 (float8_e4m3fn + weight_scale_inv, quantization_config), plus an MTP
    layer; and the dequantised float32 reference checkpoint (no MTP layer) with its transformers model."""
    root = tmp_path_factory.mktemp("fp8")
    hf = make_hf_model("deepseek_v3", num_hidden_layers=2, hidden_size=160, intermediate_size=288,
                       moe_intermediate_size=144, q_lora_rank=136, kv_lora_rank=144, initializer_range=0.05)
    plain = os.fspath(root / "plain")
    hf.save_pretrained(plain)
    tensors = read_tensors(plain)
    rng = np.random.default_rng(1)
    quantised, dequantised, n_blocks = {}, {}, 0
    for key, x in tensors.items():
        if is_fp8_weight(key, x):
            # Per-block magnitudes that differ, so each block's scale matters.
            rows, cols = -(-x.shape[0] // 128), -(-x.shape[1] // 128)
            factor = np.repeat(np.repeat(rng.uniform(0.5, 2.0, (rows, cols)), 128, 0), 128, 1)
            q, s = quantize_fp8(x * factor[: x.shape[0], : x.shape[1]])
            quantised[key], quantised[key[: -len("weight")] + "weight_scale_inv"] = q, s
            dequantised[key] = dequantize_reference(q, s)
            n_blocks += s.size
        else:
            quantised[key] = dequantised[key] = x
    assert n_blocks > 2 * sum(1 for k in quantised if k.endswith("_scale_inv"))  # most weights span >1 block
    # DeepSeek's MTP module is stored as layer num_hidden_layers (FP8 too); it must be skipped.
    n = hf.config.num_hidden_layers
    for key in list(quantised):
        if key.startswith(f"model.layers.{n - 1}."):
            quantised[key.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = quantised[key]
    quantised[f"model.layers.{n}.eh_proj.weight"], quantised[f"model.layers.{n}.eh_proj.weight_scale_inv"] = \
        quantize_fp8(rng.normal(size=(160, 320)).astype(np.float32))
    for extra in ("enorm", "hnorm", "shared_head.norm"):
        quantised[f"model.layers.{n}.{extra}.weight"] = np.ones(160, np.float32)
    quantised[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    quantised[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"]
    fp8 = write_checkpoint(plain, root / "fp8", quantised, {"quantization_config": FP8_QUANT,
                                                            "dtype": "bfloat16"})
    ref = write_checkpoint(plain, root / "ref", dequantised)
    ref_hf = HEAD_CLASSES["causal_lm"].from_pretrained(ref, dtype=torch.float32).eval()
    return fp8, ref, ref_hf, dequantised


def test_fp8_checkpoint_dequantised_at_load(fp8_checkpoints, batch, caplog):
    """An FP8 DeepSeek-V3 checkpoint loads to exactly the dequantised weights (and logits of
    transformers running those weights), and its MTP layer is skipped with a logged note."""
    fp8, ref, ref_hf, dequantised = fp8_checkpoints
    with caplog.at_level(logging.INFO, logger="jaxmodels.convert"):
        model = load(fp8, dtype=jnp.float32, mtp=False)
    assert re.search(r"skipping checkpoint layer.*\[2\].*multi-token-prediction", caplog.text), caplog.text
    assert_same_params(model, load(ref))
    # By default the MTP layer is loaded, dequantised like the rest (it is a copy of layer 1 here).
    with_mtp = params(load(fp8, dtype=jnp.float32))
    np.testing.assert_array_equal(with_mtp["model.mtp_layers.layers.mlp.experts.down_proj"][0, 5],
                                  dequantised["model.layers.1.mlp.experts.5.down_proj.weight"].T)
    ours = params(model)
    np.testing.assert_array_equal(  # an FP8 expert weight, through the [E, in, out] stacking
        ours["model.moe_layers.layers.mlp.experts.down_proj"][0, 5],
        dequantised["model.layers.1.mlp.experts.5.down_proj.weight"].T)
    ids, mask = batch
    err = max_rel_err(logits(model, ids, mask), hf_logits(ref_hf, ids, mask), mask)
    print(f"fp8 checkpoint max rel err vs dequantised transformers {err:.2e}")
    assert err < TOL


def test_mtp_layers_skipped_with_note(tmp_path, ckpts, v3_model, caplog):
    """With mtp=False, keys `model.layers.{num_hidden_layers}.*` (DeepSeek-V3's multi-token-prediction module)
    are not loaded, and the log says so; the rest of the model is untouched."""
    src, hf = ckpts["deepseek_v3"]
    n = hf.config.num_hidden_layers
    tensors = read_tensors(src)
    for key in list(tensors):
        if key.startswith(f"model.layers.{n - 1}."):
            tensors[key.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = tensors[key] + 1.0
    tensors[f"model.layers.{n}.eh_proj.weight"] = np.ones((32, 64), np.float32)
    tensors[f"model.layers.{n}.enorm.weight"] = np.ones(32, np.float32)
    path = write_checkpoint(src, tmp_path / "mtp", tensors)
    with pytest.raises(CheckpointError, match="incomplete"):  # loaded by default: this MTP layer is incomplete
        load(path)
    with caplog.at_level(logging.INFO, logger="jaxmodels.convert"):
        model = load(path, mtp=False)
    notes = [r for r in caplog.records if r.name == "jaxmodels.convert" and "multi-token-prediction" in r.message]
    assert len(notes) == 1 and f"[{n}]" in notes[0].getMessage()
    assert_same_params(model, v3_model)


def test_bf16_checkpoint(tmp_path):
    """A bfloat16 checkpoint (how DeepSeek-V2 and StableLM ship) loads in its own dtype by default,
    and upcasts exactly to float32 on request."""
    path = tmp_path / "bf16"
    make_hf_model("stablelm").to(torch.bfloat16).save_pretrained(path)
    model = load(path)
    p = params(model)
    assert all(v.dtype == jnp.bfloat16 for v in p.values())
    f32 = params(load(path, dtype=jnp.float32))
    for k in p:
        np.testing.assert_array_equal(p[k].astype(np.float32), f32[k])
    src = read_tensors(path)
    np.testing.assert_array_equal(f32["model.embed_tokens.weight"], src["model.embed_tokens.weight"].astype(np.float32))


@pytest.mark.parametrize("family", ["deepseek_v3", "stablelm", "fp8"])
def test_loading_in_small_pieces_is_bit_exact(ckpts, fp8_checkpoints, monkeypatch, family):
    """The pipelined loader with a window and pieces far smaller than the parameters (blocks sent in runs
    of layers and experts, the last run overlapping, written and transposed on the device, several
    threads) gives the same arrays as whole-parameter pieces, and its progress bar counts every byte once."""
    path = fp8_checkpoints[0] if family == "fp8" else ckpts[family][0]
    whole = load(path)
    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.kw = total, 0, kw
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    loader = jaxmodels.convert.loader
    monkeypatch.setattr(loader, "tqdm", Bar)
    # (FP8 weights are dequantised whole for every piece that cuts them: larger pieces keep this quick)
    monkeypatch.setattr(loader, "PIECE_BYTES", 60000 if family == "fp8" else 3000)
    monkeypatch.setattr(loader, "LOAD_WINDOW_BYTES", 20000)
    monkeypatch.setattr(loader, "TASK_BYTES", 1000)
    monkeypatch.setattr(loader, "LOAD_THREADS", 3)
    pieces = load(path)
    assert_same_params(whole, pieces)
    (bar,) = bars
    nbytes = sum(v.nbytes for v in params(pieces).values())
    assert bar.total == bar.n == nbytes and bar.kw["unit"] == "B", (bar.total, bar.n, nbytes)


@pytest.mark.parametrize("perm", [(1, 0, 2), (0, 2, 1), (2, 1, 0), (2, 0, 1), (1, 2, 0)])
def test_blocked_host_transpose_equals_numpy(perm):
    """The loader's host-side transpose (pieces whose parts need different axis orders) copies in blocks
    along the destination's last axis, block edges not dividing it included."""
    x = np.arange(5 * 7 * 300, dtype=np.float32).reshape(5, 7, 300)
    dst = np.empty(x.transpose(perm).shape, x.dtype)
    jaxmodels.convert.loader._transpose_into(dst, x, perm, block=64)
    np.testing.assert_array_equal(dst, x.transpose(perm))


# ----------------------------------------------------------------------------------------------- errors
def _break(kind, tmp_path, ckpts):
    """Writes a broken checkpoint of kind `kind`; returns its path."""
    family = {"router": "deepseek_v2", "duplicate_experts": "deepseek_v3"}.get(kind, "stablelm")
    src, hf = ckpts[family]
    dst = tmp_path / kind
    if kind == "missing_dir":
        return tmp_path / "does-not-exist"
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    if kind == "missing_config":
        os.remove(dst / "config.json")
    elif kind == "no_safetensors":
        os.remove(st)
    elif kind in ("missing_shard", "stale_index"):
        shutil.rmtree(dst)
        hf.save_pretrained(dst, max_shard_size="20KB")
        shards = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))
        assert len(shards) >= 2
        if kind == "missing_shard":
            os.remove(dst / shards[1])
        else:  # the index promises a tensor in a shard that does not hold it
            index = json.loads((dst / INDEX_FILE).read_text())
            index["weight_map"]["model.norm.weight"] = shards[-1] if index["weight_map"][
                "model.norm.weight"] != shards[-1] else shards[0]
            (dst / INDEX_FILE).write_text(json.dumps(index))
    elif kind == "truncated_data":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_header":
        st.write_bytes(st.read_bytes()[:6])
    elif kind == "garbage":
        st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!!" + b"\0" * 64)
    elif kind == "bad_index":
        shutil.copy(st, dst / "model-00001-of-00001.safetensors")
        (dst / INDEX_FILE).write_text("{\"weight_map\": ")
    else:
        tensors = load_file(st)
        config_changes = {}
        if kind == "missing_tensor":
            del tensors["model.layers.1.self_attn.k_proj.weight"]
        elif kind == "missing_norm":
            del tensors["model.norm.weight"]
        elif kind == "unexpected_tensor":
            tensors["model.layers.0.self_attn.mystery.weight"] = np.zeros((4, 4), np.float32)
        elif kind == "extra_layer":  # StableLM has no MTP layers: a layer beyond the config is a mismatch
            tensors["model.layers.2.input_layernorm.weight"] = np.ones(32, np.float32)
        elif kind == "shape_mismatch":
            tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
        elif kind == "wrong_config":
            config_changes = {"intermediate_size": 64}
        elif kind == "model_type":
            config_changes = {"model_type": "llama"}
        elif kind == "rope_type":
            config_changes = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}
        elif kind == "activation":
            config_changes = {"hidden_act": "tanh"}
        elif kind == "router":
            config_changes = {"topk_method": "noaux_tc"}
        elif kind == "duplicate_experts":  # per-expert keys and a fused tensor for the same layer
            tensors["model.layers.1.mlp.experts.down_proj"] = np.stack(
                [tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] for e in range(8)])
        elif kind == "fp8_without_scale":
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(FP8)
        elif kind == "scale_without_fp8":
            tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = np.ones((1, 1), np.float32)
        elif kind == "fp8_e5m2":
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(
                ml_dtypes.float8_e5m2)
            tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = np.ones((1, 1), np.float32)
        shutil.rmtree(dst)
        write_checkpoint(src, dst, tensors, config_changes)
    return dst


ERRORS = [  # kind, exception, the message must match (cause ... fix)
    ("missing_dir", FileNotFoundError, r"does-not-exist.*does not exist"),
    ("missing_config", FileNotFoundError, r"no config\.json.*pass a Hugging Face checkpoint directory"),
    ("no_safetensors", FileNotFoundError, r"no model\.safetensors or model\.safetensors\.index\.json.*save_pretrained"),
    ("missing_shard", FileNotFoundError, r"lists model-00002-of-\d+\.safetensors, which is missing.*download"),
    ("stale_index", CheckpointError, r"lacks tensors its index promises.*model\.norm\.weight.*re-download"),
    ("bad_index", CheckpointError, r"not a valid safetensors index.*re-download"),
    ("truncated_data", CheckpointError, r"model\.safetensors.*corrupt or truncated.*re-download"),
    ("truncated_header", CheckpointError, r"model\.safetensors.*corrupt or truncated.*re-download"),
    ("garbage", CheckpointError, r"model\.safetensors.*corrupt or truncated.*re-download"),
    ("missing_tensor", CheckpointError, r"missing.*model\.layers\.1\.self_attn\.k_proj\.weight.*incomplete"),
    ("missing_norm", CheckpointError, r"no tensor.*'model\.norm\.weight'.*incomplete"),
    ("unexpected_tensor", CheckpointError, r"unexpected tensor 'model\.layers\.0\.self_attn\.mystery\.weight'"
                                           r".*config\.json"),
    ("extra_layer", CheckpointError, r"unexpected tensor 'model\.layers\.2\.input_layernorm\.weight'.*"
                                     r"num_hidden_layers=2"),
    ("shape_mismatch", CheckpointError, r"shape mismatch for 'model\.layers\.0\.mlp\.up_proj\.weight': checkpoint "
                                        r"has \(40, 32\), the model expects \(48, 32\).*config\.json"),
    ("wrong_config", CheckpointError, r"shape mismatch.*config\.json"),
    ("model_type", ConfigError, r"model_type='llama' is not supported.*deepseek_v2"),
    ("rope_type", ConfigError, r"rope_type='longrope' is not supported; use one of"),
    ("activation", ConfigError, r"hidden_act='tanh' is not supported; use one of"),
    ("router", ConfigError, r"topk_method='noaux_tc' is not a DeepSeek-V2 router; use 'greedy' or "
                            r"'group_limited_greedy'"),
    ("duplicate_experts", CheckpointError, r"'model\.layers\.1\.mlp\.experts\.down_proj' and "
                                           r"'model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight' overlap"
                                           r".*not both"),
    ("fp8_without_scale", CheckpointError, r"up_proj\.weight is float8.*weight_scale_inv is missing"),
    ("scale_without_fp8", CheckpointError, r"up_proj\.weight_scale_inv.*not float8"),
    ("fp8_e5m2", CheckpointError, r"float8_e5m2.*only float8_e4m3fn"),
]


@pytest.mark.parametrize("kind,exc,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_converter_errors(tmp_path, ckpts, kind, exc, message):
    path = _break(kind, tmp_path, ckpts)
    with pytest.raises(exc, match=message):
        load(path)


# ----------------------------------------------------------------------------------------------- export
EXPORTS = [
    ("deepseek_v2", "causal_lm", {}),
    ("deepseek_v3", "causal_lm", {}),
    ("stablelm", "causal_lm", {"tie_word_embeddings": True, "qk_layernorm": True, "use_qkv_bias": True}),
    ("deepseek_v3", "sequence_classification", {}),
    ("stablelm", "token_classification", {}),
]


@pytest.mark.parametrize("family,head,overrides", EXPORTS, ids=[f"{f}-{h}" for f, h, _ in EXPORTS])
def test_export_round_trip(tmp_path, batch, family, head, overrides):
    """save_pretrained writes a sharded HF checkpoint (index + several shards) that transformers loads
    with no missing/unexpected keys and the same logits; jaxmodels re-loads it to identical parameters."""
    src, hf = make_checkpoint(tmp_path, family, head, **overrides)
    model = load(src)
    out = tmp_path / "export"
    jaxmodels.save_pretrained(model, out, max_shard_size="30KB", progress=False)
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files left behind"
    # The hub's names and layouts: the export holds exactly the tensors transformers saved.
    theirs, ours = read_tensors(src), read_tensors(out)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    back, info = HEAD_CLASSES[head].from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert type(back) is type(hf)
    ids, mask = batch
    ref = hf_logits(hf, ids, mask)
    np.testing.assert_array_equal(hf_logits(back.eval(), ids, mask), ref)
    keep = mask if head != "sequence_classification" else None
    err = max_rel_err(logits(model, ids, mask), hf_logits(back.eval(), ids, mask), keep)
    print(f"export {family}/{head}: transformers(export) vs jaxmodels max rel err {err:.2e}")
    assert err < TOL
    assert_same_params(load(out), model)


VARIANTS = [
    ("deepseek_v2", "causal_lm", dict(q_lora_rank=None, attention_bias=True, mlp_bias=True, first_k_dense_replace=0)),
    ("deepseek_v2", "sequence_classification", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    ("deepseek_v3", "causal_lm", dict(first_k_dense_replace=3)),  # no MoE layers
    ("deepseek_v3", "token_classification", dict(first_k_dense_replace=0, tie_word_embeddings=True)),
    ("stablelm", "causal_lm", dict(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True)),
]


@pytest.mark.parametrize("family,head,overrides", VARIANTS, ids=[f"{f}-{h}" for f, h, _ in VARIANTS])
def test_export_writes_the_hub_tensors(tmp_path, family, head, overrides):
    """For every layout variant (biases, no q_lora, dense-only or MoE-only stacks, per-head q/k norms,
    classification heads), load -> save_pretrained writes exactly the tensors transformers saved, under
    the same names, and a config.json transformers reads back to the same config."""
    src, hf = make_checkpoint(tmp_path, family, head, **overrides)
    out = jaxmodels.save_pretrained(load(src), tmp_path / "export", progress=False)
    streamed = convert_checkpoint(src, tmp_path / "streamed", progress=False)  # without building the model
    theirs = read_tensors(src)
    for ours in (read_tensors(out), read_tensors(streamed)):
        assert sorted(ours) == sorted(theirs)
        for k in theirs:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert json.loads(open(os.path.join(out, "config.json")).read()) == json.loads(
        open(os.path.join(streamed, "config.json")).read())
    cfg = jaxmodels.load_config(out)
    assert cfg == jaxmodels.load_config(src)
    back = type(hf.config).from_pretrained(out)
    for name in ("num_hidden_layers", "first_k_dense_replace", "q_lora_rank", "attention_bias", "mlp_bias",
                 "topk_method", "tie_word_embeddings", "qk_layernorm", "use_parallel_residual", "architectures"):
        if hasattr(hf.config, name):
            assert getattr(back, name) == getattr(hf.config, name), name


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, ckpts, monkeypatch):
    """A save that fails mid-write (2nd shard) leaves the checkpoint already in out_dir byte-identical
    and loadable, and no temporary directory behind; a later successful save replaces it whole."""
    src, _ = ckpts["stablelm"]
    model = load(src)
    out = tmp_path / "out"
    jaxmodels.save_pretrained(model, out, max_shard_size="20KB", progress=False)
    before = dir_digest(out)
    assert INDEX_FILE in before

    other, _ = make_checkpoint(tmp_path / "other", "stablelm", seed=1)
    other_model = load(other)
    real_save, calls = jaxmodels.convert.export.save_file, []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(jaxmodels.convert.export, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        jaxmodels.save_pretrained(other_model, out, max_shard_size="20KB", progress=False)
    assert len(calls) == 2
    assert dir_digest(out) == before  # nothing added, removed or changed (no temp dir either)
    assert_same_params(load(out), model)

    # After the failure, a successful single-file save replaces the sharded one (stale shards removed).
    monkeypatch.setattr(jaxmodels.convert.export, "save_file", real_save)
    jaxmodels.save_pretrained(other_model, out, progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert_same_params(load(out), other_model)


def test_atomic_directory_modes_and_failures(tmp_path):
    """The one atomic writer: files come out with the mode open() gives (safetensors' writer alone makes
    them 0600), a failure leaves neither the new folder nor its staging folder, a path under a file is
    refused before anything is written, and stale files go only once the new ones are in."""
    from safetensors.numpy import save_file

    from jaxmodels.convert.files import atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out) as stage:
        save_file({"x": np.zeros(3, np.float32)}, stage.path("a.safetensors"))
        (tmp_path / "unused").write_text("")
        with open(stage.path("config.json"), "w") as f:
            f.write("{}")
        stage.commit(["a.safetensors", "config.json"])
    umask = os.umask(0)
    os.umask(umask)
    assert sorted(os.listdir(out)) == ["a.safetensors", "config.json"]
    assert {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == {
        "a.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}

    with pytest.raises(OSError, match="simulated"):
        with atomic_directory(tmp_path / "new") as stage:
            open(stage.path("b"), "w").close()
            raise OSError("simulated")
    assert not (tmp_path / "new").exists()

    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="is a file"):
        with atomic_directory(tmp_path / "file"):
            pass
    with pytest.raises(OSError, match="is under the file"):
        with atomic_directory(tmp_path / "file" / "sub" / "out"):
            pass

    with atomic_directory(out) as stage:
        open(stage.path("b.safetensors"), "w").close()
        stage.commit(["b.safetensors"], stale=lambda name: name.endswith(".safetensors"))
    assert sorted(os.listdir(out)) == ["b.safetensors", "config.json"]


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_convert_fp8_to_bf16(tmp_path, fp8_checkpoints, batch):
    """`jaxmodels convert` turns an FP8 checkpoint into a bf16 HF checkpoint (sharded), which equals
    the dequantised weights rounded to bf16 and loads in transformers."""
    from jaxmodels.cli import main

    fp8, ref, ref_hf, dequantised = fp8_checkpoints
    out = tmp_path / "bf16"
    assert main(["convert", "--model", fp8, "--out", os.fspath(out), "--dtype", "bf16",
                 "--max-shard-size", "300KB", "--no-mtp"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert (out / INDEX_FILE).exists()
    tensors = read_tensors(out)
    assert sorted(tensors) == sorted(dequantised)  # no scales, no MTP layer
    for k, v in dequantised.items():
        # The router's correction bias only ranks experts: it stays float32, as in DeepSeek's release.
        want = np.float32 if k.endswith("e_score_correction_bias") else ml_dtypes.bfloat16
        assert tensors[k].dtype == want, k
        np.testing.assert_array_equal(tensors[k], v.astype(want), err_msg=k)
    # Streaming conversion writes what loading then saving writes, file for file.
    saved = tmp_path / "saved"
    jaxmodels.save_pretrained(load(fp8, dtype=jnp.bfloat16, mtp=False), saved, max_shard_size="300KB", progress=False)
    assert sorted(os.listdir(saved)) == sorted(os.listdir(out))
    assert json.loads((saved / "config.json").read_text()) == cfg
    assert json.loads((saved / INDEX_FILE).read_text()) == json.loads((out / INDEX_FILE).read_text())
    for k, v in read_tensors(saved).items():
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)
    back, info = HEAD_CLASSES["causal_lm"].from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    # transformers and jaxmodels agree on the converted file (bf16 weights computed in float32). (Against
    # the float32 reference the logits move by up to ~40% here: rounding to bf16 flips expert choices.)
    ids, mask = batch
    err = max_rel_err(logits(load(out, dtype=jnp.float32), ids, mask), hf_logits(back.eval(), ids, mask), mask)
    print(f"cli fp8 -> bf16: jaxmodels vs transformers on the converted checkpoint max rel err {err:.2e}")
    assert err < TOL


def test_cli_convert_f32_is_lossless(tmp_path, ckpts, capsys):
    """Tensor for tensor, with the source's tokenizer files (so the result generates), files 0644."""
    from jaxmodels.cli import main
    from jaxmodels.tokenizer import Tokenizer

    src = shutil.copytree(ckpts["deepseek_v2"][0], tmp_path / "src")
    add_word_tokenizer(src)
    out = tmp_path / "f32"
    assert main(["convert", "--model", os.fspath(src), "--out", os.fspath(out), "--dtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert Tokenizer.from_checkpoint(os.fspath(out)).encode("the cat") == Tokenizer.from_checkpoint(src).encode("the cat")
    umask = os.umask(0)
    os.umask(umask)
    assert {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == {f: 0o666 & ~umask for f in os.listdir(out)}
    theirs, ours = read_tensors(src), read_tensors(out)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    # Errors are reported as one clear line and exit code 1, not a traceback.
    assert main(["convert", "--model", os.fspath(tmp_path / "nope"), "--out", os.fspath(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "--model", os.fspath(src), "--out", os.fspath(src)]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["convert", "--model", os.fspath(src), "--out", os.fspath(src / "config.json" / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is under the file" in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------- on a mesh
MESH_WORKER = """
import sys
import numpy as np, jax.numpy as jnp
sys.path[:0] = sys.argv[1:3]
import test_convert as T
from jaxmodels.sharding import make_mesh
assert len(__import__("jax").devices()) == 4
for path in sys.argv[3:]:
    ref = T.params(T.load(path, dtype=jnp.float32))
    for shape in (dict(expert=2, tensor=2), dict(fsdp=2, tensor=2), dict(expert=4)):
        got = T.params(T.load(path, dtype=jnp.float32, mesh=make_mesh(**shape)))
        bad = [k for k in ref if not np.array_equal(ref[k], got[k])]
        assert not bad, (path, shape, bad)
        print("ok", path, shape)
"""


@pytest.mark.slow  # a subprocess with several devices
def test_fp8_mtp_and_fused_experts_on_a_mesh(tmp_path, fp8_checkpoints, ckpts):
    """Loading straight onto a 4-device mesh (each device reads its own slices) gives the same
    parameters for an FP8 checkpoint with an MTP layer and for fused expert tensors."""
    import subprocess
    import sys

    fp8 = fp8_checkpoints[0]
    src, _ = ckpts["deepseek_v3"]
    fused = write_checkpoint(src, tmp_path / "fused", fuse_experts(read_tensors(src)))
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_WORKER, here, os.path.dirname(here), fp8, fused],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 6


def test_zero_width_shared_experts_on_a_mesh(tmp_path, batch):
    """n_shared_experts=0 gives zero-width tensors; the mesh loader (here a 1-device mesh, the same code
    path as a real one) must build them instead of asking safetensors for an empty slice."""
    path, hf = make_checkpoint(tmp_path, "deepseek_v3", n_shared_experts=0)
    model = jaxmodels.from_pretrained(path, mesh=jaxmodels.make_mesh(), progress=False)
    assert model.model.moe_layers.layers.mlp.shared_experts.down_proj.weight.shape[-1] == 0
    ids, mask = batch
    err = max_rel_err(logits(model, ids, mask), hf_logits(hf, ids, mask), mask)
    assert err < TOL, err


@pytest.mark.slow  # a subprocess
def test_hub_id_resolves_from_the_local_hub_cache(tmp_path, ckpts, batch):
    """A hub id goes through huggingface_hub: offline, a snapshot already in the hub cache loads, and an
    id that is not cached fails with a message naming it (no network is used: HF_HUB_OFFLINE=1)."""
    import subprocess
    import sys

    path, hf = ckpts["deepseek_v3"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-v3"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ids, mask = batch
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    script = f"""
import numpy as np, jax.numpy as jnp, jaxmodels
m = jaxmodels.from_pretrained("test-org/tiny-v3", progress=False)
np.save({str(tmp_path / "out.npy")!r}, np.asarray(m(jnp.asarray(np.load({str(tmp_path / "ids.npy")!r})),
        attention_mask=jnp.asarray(np.load({str(tmp_path / "mask.npy")!r}))).logits))
try:
    jaxmodels.from_pretrained("test-org/not-cached", progress=False)
except FileNotFoundError as e:
    print("ERROR:", e)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=root,
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert max_rel_err(np.load(tmp_path / "out.npy"), hf_logits(hf, ids, mask), mask) < TOL
    assert "'test-org/not-cached' is not a local directory and could not be downloaded" in out.stdout
