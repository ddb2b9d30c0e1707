"""Tiny random transformers models saved with save_pretrained: the oracle every test compares against.

Weights use a larger std and perturbed norms (and router biases) so logits are O(1) and a skipped
norm, a wrong rope layout or a wrong router cannot hide.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

TINY = {
    "deepseek_v2": dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, topk_method="greedy", max_position_embeddings=64, pad_token_id=0,
    ),
    "deepseek_v3": dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, n_group=4,
        topk_group=2, num_experts_per_tok=3, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=64, pad_token_id=0,
    ),
    "stablelm": dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    ),
}

CONFIG_CLASSES = {
    "deepseek_v2": transformers.DeepseekV2Config,
    "deepseek_v3": transformers.DeepseekV3Config,
    "stablelm": transformers.StableLmConfig,
}
HEAD_CLASSES = {
    "causal_lm": transformers.AutoModelForCausalLM,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "token_classification": transformers.AutoModelForTokenClassification,
}


def _deepseek_v2_token_classification():
    """transformers has no DeepSeek-V2 token-classification head. V3's is nothing but transformers'
    GenericForTokenClassification on the family's PreTrainedModel; this builds V2's the same way, from
    transformers' own pieces, so the oracle is still transformers code."""
    from transformers.modeling_layers import GenericForTokenClassification
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2PreTrainedModel

    return type("DeepseekV2ForTokenClassification", (GenericForTokenClassification, DeepseekV2PreTrainedModel), {})


def hf_head_class(family: str, head: str):
    """The transformers class that builds `head` for `family` (an Auto class, or V2's composed token head)."""
    if family == "deepseek_v2" and head == "token_classification":
        return _deepseek_v2_token_classification()
    return HEAD_CLASSES[head]


def hf_config(family: str, **overrides):
    kwargs = {**TINY[family], "initializer_range": 0.15, **overrides}
    return CONFIG_CLASSES[family](**kwargs)


def make_hf_model(family: str, head: str = "causal_lm", seed: int = 0, **overrides):
    """A float32 transformers model with O(1) logits."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cls = hf_head_class(family, head)
    if cls is HEAD_CLASSES.get(head):
        model = cls.from_config(cfg, dtype=torch.float32).eval()
    else:
        model = cls._from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.normal_(0.0, 0.2)
    return model


def save_hf_model(model, path) -> str:
    path = os.fspath(path)
    model.save_pretrained(path)
    return path


def make_checkpoint(tmp_path, family: str, head: str = "causal_lm", seed: int = 0, **overrides):
    """Saves a tiny model under tmp_path; returns (checkpoint dir, the transformers model)."""
    model = make_hf_model(family, head, seed, **overrides)
    return save_hf_model(model, os.path.join(os.fspath(tmp_path), f"{family}-{head}")), model


def random_batch(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0, pad_left: int = 0, pad_right: int = 0,
                 pad_id: int = 0):
    """input_ids avoiding pad_id, and an attention_mask with `pad_left` / `pad_right` padding on row 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad_left:
        ids[0, :pad_left] = pad_id
        mask[0, :pad_left] = 0
    if pad_right:
        ids[0, seq - pad_right:] = pad_id
        mask[0, seq - pad_right:] = 0
    return ids, mask


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()


def max_rel_err(ours, ref, mask=None) -> float:
    """max |ours - ref| / max |ref| over the positions where mask (broadcast on the last axis) is set."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        keep = np.asarray(mask, bool)
        ours, ref = ours[keep], ref[keep]
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-9))


WORDS = ("the cat sat on a mat and the dog ran to the red ball while birds sang over green hills "
         "user assistant system : hello world how are you today fine thanks").split() + [f"w{i}" for i in range(62)]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def add_word_tokenizer(path) -> str:
    """Writes a WordLevel tokenizer.json over WORDS (96 ids: every id the tiny models produce decodes) and a
    tokenizer_config.json with special tokens and the chat template TEMPLATE into checkpoint dir `path`."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)
    corpus = [" ".join(WORDS)] + [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"]))
    assert tok.get_vocab_size() == 96
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "[PAD]", "unk_token": "[UNK]", "chat_template": TEMPLATE}, f)
    return path


@contextlib.contextmanager
def count_compiles():
    """Counts the XLA compilations inside the block (jax.monitoring's backend-compile events), by the jitted
    function's name: yields a Counter {"jit(name)": compiles}, filled as the block runs."""
    import jax

    counts = collections.Counter()

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[kw.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
