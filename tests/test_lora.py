"""LoRA: adapters on the linear layers (and DeepSeek's routed experts), merge, PEFT adapter files.

Oracles: a model whose weights were merged by hand (numpy, W + alpha/r * B @ A), transformers loading the
merged export, and peft.PeftModel loading our adapter onto the transformers base model.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxmodels
from jaxmodels.convert.keymap import CheckpointError
from jaxmodels.generate import decode_step, prefill, prompt_positions
from jaxmodels.layers.linear import Linear, LoRAParam
from jaxmodels.train.lora import (LoRAError, add_lora, has_lora, load_adapter, lora_config, merge_lora,
                                  save_adapter, valid_targets)
from tiny import hf_logits, make_checkpoint, max_rel_err, random_batch

TOL = 1e-4
FAMILIES = ["deepseek_v2", "deepseek_v3", "stablelm"]
RANK, ALPHA = 4, 8
# Every linear target of the family (and the routed experts for DeepSeek); PEFT-exportable: without experts.
ALL_TARGETS = {
    "deepseek_v2": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj", "experts"],
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj", "experts"],
    "stablelm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

_JITTED = {}
# As tests/test_parity.py: LLVM's cheap pipeline (same HLO, less optimised CPU code) halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def logits(model, ids, mask):
    """The model's logits, jitted once per model structure (graphdef)."""
    graphdef, state = nnx.split(model)
    fn = _JITTED.get(graphdef)
    if fn is None:
        fn = _JITTED[graphdef] = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).logits,
                                         compiler_options=FAST_COMPILE)
    return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def load(path):
    return jaxmodels.from_pretrained(os.fspath(path), progress=False)


def perturb_adapters(model, seed=1):
    """Random A and B (B is zero after add_lora, which would hide every bug)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        var.set_value(jnp.asarray(rng.normal(0.0, 0.1, var.shape), var.dtype))


def hand_merged_state(model) -> dict:
    """{param path: merged value} computed with numpy from the flat state, independent of merge_lora."""
    flat = {tuple(map(str, p)): np.asarray(v.get_value(), np.float64) for p, v in
            nnx.to_flat_state(nnx.state(model))}
    out = {}
    for path, a in flat.items():
        if path[-1] == "lora_a":  # Linear: weight [L, out, in] += s * B @ A
            b = flat[path[:-1] + ("lora_b",)]
            w = path[:-1] + ("weight",)
            out[w] = flat[w] + (ALPHA / RANK) * np.einsum("lor,lri->loi", b, a)
        elif path[-1].endswith("_lora_a"):  # experts, per projection: s * B @ A ([out, in]) per expert
            name = path[-1][: -len("_lora_a")]
            delta = (ALPHA / RANK) * np.einsum("leor,leri->leoi", flat[path[:-1] + (f"{name}_lora_b",)], a)
            if name == "down_proj":  # down_proj [L, E, in, out]
                w = path[:-1] + (name,)
                out[w] = flat[w] + np.swapaxes(delta, -1, -2)
            else:  # gate_up_proj [L, E, 2, out, in]: gate at 0, up at 1
                w = path[:-1] + ("gate_up_proj",)
                out.setdefault(w, flat[w].copy())[:, :, ("gate_proj", "up_proj").index(name)] += delta
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (checkpoint path, hf model, base logits, LoRA model with perturbed adapters, its logits)}."""
    out = {}
    for fam in FAMILIES:
        path, hf = make_checkpoint(tmp_path_factory.mktemp(fam), fam)
        ids, mask = random_batch(hf.config.vocab_size, pad_left=2)
        base = load(path)
        base_logits = logits(base, ids, mask)
        model = add_lora(load(path), rank=RANK, alpha=ALPHA, targets=ALL_TARGETS[fam], seed=0)
        # B starts at zero: the adapted model is the base model.
        assert max_rel_err(logits(model, ids, mask), base_logits, mask) < 1e-6
        perturb_adapters(model)
        out[fam] = dict(path=path, hf=hf, ids=ids, mask=mask, base=base, base_logits=base_logits, model=model,
                        lora_logits=logits(model, ids, mask))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_forward_equals_hand_merged_and_merge_lora(tiny, family, tmp_path):
    t = tiny[family]
    ids, mask, model = t["ids"], t["mask"], t["model"]
    assert max_rel_err(t["lora_logits"], t["base_logits"], mask) > 1e-2, "perturbed adapters must change logits"
    # Oracle 1: the base model with weights merged by hand.
    ref = load(t["path"])
    merged = hand_merged_state(model)
    n_experts = sum(1 for p in merged if p[-2] == "experts")
    assert n_experts == (2 if family != "stablelm" else 0)  # gate_up and down of the MoE stack
    for p, var in nnx.to_flat_state(nnx.state(ref)):
        key = tuple(map(str, p))
        if key in merged:
            var.set_value(jnp.asarray(merged.pop(key), var.dtype))
    assert not merged, f"adapted weights with no base weight: {list(merged)}"
    hand = logits(ref, ids, mask)
    assert max_rel_err(t["lora_logits"], hand, mask) < TOL
    # merge_lora: exact fold, adapters gone, same logits; exported, transformers loads it, same logits.
    m = add_lora(load(t["path"]), rank=RANK, alpha=ALPHA, targets=ALL_TARGETS[family])
    nnx.update(m, nnx.state(model, LoRAParam))
    with pytest.raises(CheckpointError, match="merge_lora"):
        jaxmodels.save_pretrained(m, tmp_path / "refused", progress=False)
    merge_lora(m)
    assert not has_lora(m) and lora_config(m) is None
    assert not jax.tree.leaves(nnx.state(m, LoRAParam))
    assert max_rel_err(logits(m, ids, mask), hand, mask) < TOL
    out = jaxmodels.save_pretrained(m, tmp_path / "merged", progress=False)
    hf_merged = type(t["hf"]).from_pretrained(out, dtype=torch.float32).eval()
    assert max_rel_err(hf_logits(hf_merged, ids, mask), t["lora_logits"], mask) < TOL


@pytest.mark.parametrize("family", ["deepseek_v3", "stablelm"])
def test_cached_decode_and_greedy_of_lora_model(tiny, family):
    """Absorbed MLA decode reads kv_b_proj's merged weight: cached decode == full forward, and greedy
    generation of the LoRA model == greedy of the merged model."""
    t = tiny[family]
    model = t["model"]
    v = model.config.vocab_size
    rng = np.random.default_rng(3)
    ids = rng.integers(3, v, (2, 5))
    future = rng.integers(3, v, (2, 4))
    full = np.concatenate([ids, future], 1)
    ref = logits(model, full, np.ones_like(full))
    step_logits, cache, kv_valid, pos = prefill(model, ids, cache_len=16)
    for step in range(future.shape[1] + 1):
        err = max_rel_err(step_logits, ref[:, ids.shape[1] - 1 + step])
        assert err < TOL, (step, err)
        if step < future.shape[1]:
            step_logits, cache = decode_step(model, cache, future[:, step], pos, kv_valid, ids.shape[1] + step)
            pos = pos + 1
    merged = add_lora(load(t["path"]), rank=RANK, alpha=ALPHA, targets=ALL_TARGETS[family])
    nnx.update(merged, nnx.state(model, LoRAParam))
    merge_lora(merged)
    ours = jaxmodels.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(ours, jaxmodels.generate(merged, ids, max_new_tokens=6, eos_token_id=[]))
    # ... and the adapters matter for the generated tokens.
    assert not np.array_equal(ours, jaxmodels.generate(t["base"], ids, max_new_tokens=6, eos_token_id=[]))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_round_trip(tiny, family, tmp_path):
    """save_adapter -> peft.PeftModel on the transformers base model gives our LoRA logits;
    load_adapter reads it back exactly."""
    peft = pytest.importorskip("peft")
    t = tiny[family]
    # DeepSeek: peft (transformers 5) reads gate/up/down_proj as the routed experts, so the dense/shared MLPs
    # cannot be written (see test_deepseek_mlp_adapters_are_refused); the routed experts can.
    targets = ([x for x in ALL_TARGETS[family] if x not in ("gate_proj", "up_proj", "down_proj")]
               if family != "stablelm" else ALL_TARGETS[family])
    model = add_lora(load(t["path"]), rank=RANK, alpha=ALPHA, targets=targets)
    perturb_adapters(model, seed=5)
    ours = logits(model, t["ids"], t["mask"])
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["task_type"]) == ("LORA", RANK, ALPHA, "CAUSAL_LM")
    hf = type(t["hf"]).from_pretrained(t["path"], dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    # One loaded lora_A per (layer, adapted linear module), plus peft's two wrappers of the fused experts per MoE
    # layer. Depending on its version, peft also wraps the dense / shared-expert MLPs that the target names match
    # (DeepSeek); the file has nothing for them, so their lora_B stays zero: inert.
    params = dict(peft_model.named_parameters())
    loaded = [n for n in params if ".lora_A." in n and bool(params[n.replace(".lora_A.", ".lora_B.")].abs().sum())]
    inert = [n for n in params if ".lora_B." in n and not bool(params[n].abs().sum())]
    assert all(".mlp." in n and ".experts" not in n for n in inert), inert
    n_ours = sum(v.shape[0] for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam)) if p[-1] == "lora_a")
    assert len(loaded) == n_ours + (2 * model.config.num_moe_layers if family != "stablelm" else 0)
    assert max_rel_err(hf_logits(peft_model, t["ids"], t["mask"]), ours, t["mask"]) < TOL
    # Round trip onto a fresh base model.
    back = load_adapter(load(t["path"]), out)
    assert lora_config(back) == lora_config(model) == {"rank": RANK, "alpha": ALPHA, "targets": sorted(targets)}
    a = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    b = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(back, LoRAParam))}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_deepseek_mlp_adapters_are_refused(tiny, tmp_path):
    with pytest.raises(LoRAError, match=r"dense / shared-expert MLP \(\['down_proj', 'gate_proj', 'up_proj'\]\).*merge_lora"):
        save_adapter(tiny["deepseek_v3"]["model"], tmp_path / "a")
    assert not os.path.exists(tmp_path / "a")
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_adapter(tiny["deepseek_v3"]["base"], tmp_path / "b")


def test_split_selects_exactly_the_adapters(tiny):
    model = tiny["deepseek_v3"]["model"]
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    lora_paths = [tuple(map(str, p)) for p, _ in nnx.to_flat_state(lora)]
    assert lora_paths and all(p[-1].endswith(("lora_a", "lora_b")) for p in lora_paths)
    assert not any(tuple(map(str, p))[-1].endswith(("lora_a", "lora_b")) for p, _ in nnx.to_flat_state(rest))
    # Every adapted Linear in both stacks, shared experts included; routed experts: 3 pairs per MoE stack.
    cfg = model.config
    # 8 linear targets x (dense stack, MoE stack: its MLP is the shared experts) x (A, B) + 3 expert projections x 2.
    expect = (len(ALL_TARGETS["deepseek_v3"]) - 1) * 2 * 2 + 3 * 2
    assert len(lora_paths) == expect, lora_paths
    for p, v in nnx.to_flat_state(lora):
        axes = v.get_metadata()["axes"]
        assert axes[0] == "layers" and v.shape[0] == (cfg.num_dense_layers if p[1] == "dense_layers"
                                                      else cfg.num_moe_layers)
        assert len(axes) == v.ndim
    # Stacked adapters: each layer has its own random A.
    a = np.asarray(nnx.state(add_lora(load(tiny["deepseek_v3"]["path"]), rank=2, alpha=2, targets=["o_proj"]),
                             LoRAParam)["model"]["moe_layers"]["layers"]["self_attn"]["o_proj"]["lora_a"].get_value())
    assert not np.allclose(a[0], a[1])


def test_bad_targets(tiny):
    path = tiny["deepseek_v2"]["path"]
    with pytest.raises(LoRAError, match=r"unknown LoRA target\(s\) \['k_proj'\].*kv_b_proj"):
        add_lora(load(path), rank=2, alpha=4, targets=["k_proj"])
    with pytest.raises(LoRAError, match=r"\['q_proj'\] match no layer"):  # q_lora_rank set: q_a/q_b instead
        add_lora(load(path), rank=2, alpha=4, targets=["q_proj"])
    with pytest.raises(LoRAError, match="unknown.*experts"):
        add_lora(load(tiny["stablelm"]["path"]), rank=2, alpha=4, targets=["experts"])
    with pytest.raises(LoRAError, match="rank"):
        add_lora(load(path), rank=0, alpha=4, targets=["o_proj"])
    with pytest.raises(LoRAError, match="already has LoRA"):
        add_lora(tiny["deepseek_v2"]["model"], rank=2, alpha=4, targets=["o_proj"])
    assert sorted(valid_targets(tiny["stablelm"]["model"])) == sorted(ALL_TARGETS["stablelm"])
