"""The embedded default model (jaxmodels/default_model/): what it is, its recorded held-out numbers, parity
with transformers, the first command of the README, and that an install ships it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxmodels
from jaxmodels.tokenizer import Tokenizer
from tiny import max_rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = jaxmodels.default_model_dir()


def _eval():
    with open(os.path.join(DIR, "eval.json")) as f:
        return json.load(f)


def _sample():
    with open(os.path.join(DIR, "heldout_sample.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_it_is_a_small_deepseek_v3_inside_the_package():
    assert os.path.dirname(DIR) == os.path.dirname(os.path.abspath(jaxmodels.__file__))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert os.path.isfile(os.path.join(DIR, name)), name
    with open(os.path.join(DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "deepseek_v3" and cfg["topk_method"] == "noaux_tc"
    assert cfg["n_group"] >= 2 and cfg["topk_group"] >= 1 and cfg["n_shared_experts"] >= 1
    assert 1 <= cfg["first_k_dense_replace"] < cfg["num_hidden_layers"]
    assert cfg["kv_lora_rank"] > 0  # MLA
    total = sum(os.path.getsize(os.path.join(DIR, n)) for n in os.listdir(DIR))
    assert total <= 10_000_000, f"the embedded model takes {total} bytes; the budget is 10 MB"
    # Held out means never trained on: the sample's files are held-out files.
    sample_paths = _eval()["heldout_sample"]["paths"]
    import hashlib
    assert sample_paths and all(int(hashlib.sha256(p.encode()).hexdigest(), 16) % 50 == 0 for p in sample_paths)


def test_recorded_heldout_numbers_match_the_shipped_weights():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "default_model"))
    try:
        from evaluate import heldout_metrics
    finally:
        sys.path.pop(0)
    rec = _eval()
    model = jaxmodels.from_pretrained(DIR, jnp.float32, progress=False)
    got = heldout_metrics(model, Tokenizer.from_checkpoint(DIR), _sample(), window=rec["heldout_sample"]["window"])
    want = rec["heldout_sample"]
    assert got["tokens"] == want["tokens"] and got["bytes"] == want["bytes"]
    assert abs(got["loss"] - want["loss"]) < 1e-3, (got, want)
    assert abs(got["bits_per_byte"] - want["bits_per_byte"]) < 1e-3, (got, want)
    # The card quotes the same numbers, and the definition holds: nats / ln 2 / bytes.
    with open(os.path.join(DIR, "MODEL_CARD.md"), encoding="utf-8") as f:
        card = f.read()
    full = rec["heldout"]
    for value in (want["bits_per_byte"], full["bits_per_byte"], full["loss"], full["gzip_9_bits_per_byte"],
                  full["xz_9e_bits_per_byte"]):
        assert f"{value:.3f}" in card, value
    assert math.isclose(full["bits_per_byte"], full["nats"] / math.log(2) / full["bytes"], rel_tol=1e-9)
    assert full["bits_per_byte"] < full["gzip_9_bits_per_byte"]  # the bar: better than gzip -9


def test_transformers_gives_the_same_logits():
    tok = Tokenizer.from_checkpoint(DIR)
    ids = np.asarray([tok.encode(_sample()[0])[:160]])
    ours = np.asarray(jaxmodels.from_pretrained(DIR, jnp.float32, progress=False)(ids).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert max_rel_err(ours, ref) < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow  # a subprocess
def test_first_command_streams_python_as_valid_utf8():
    """The README's first command, in a fresh process: no --model, nothing downloaded."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    prompt = "def read_config(path):"
    proc = subprocess.run([sys.executable, "-m", "jaxmodels.cli", "generate", "--prompt", prompt,
                           "--max-new-tokens", "48"], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.decode("utf-8")  # strict: raises on a broken byte sequence
    assert text.startswith(prompt) and text.endswith("\n")
    continuation = text[len(prompt):]
    assert continuation.strip() and "\ufffd" not in continuation
    # What it prints is the greedy continuation jaxmodels.generate produces.
    model = jaxmodels.from_pretrained(DIR, progress=False)
    tok = Tokenizer.from_checkpoint(DIR)
    ids = np.asarray([tok.encode(prompt)])
    out = jaxmodels.generate(model, ids, max_new_tokens=48, eos_token_id=model.config.eos_token_ids,
                             pad_token_id=model.config.pad_token_id)
    from jaxmodels.generate_cli import continuation as cut
    new = [int(t) for t in out[0, ids.shape[1]:] if int(t) not in model.config.eos_token_ids]
    assert continuation == cut(tok, list(ids[0]), new) + "\n"


@pytest.mark.slow
def test_a_built_wheel_ships_the_default_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True, timeout=300)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(os.path.join(tmp_path, wheel)).namelist())
    for name in sorted(os.listdir(DIR)):
        assert f"jaxmodels/default_model/{name}" in names, name
