"""`jaxmodels generate`: a tiny checkpoint with a tokenizer trained here, the in-memory tiny-random model.
(The embedded default model's CLI run: tests/test_default_model.py.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import jaxmodels
from jaxmodels.cli import main
from jaxmodels.generate_cli import continuation
from jaxmodels.tokenizer import Tokenizer as OurTokenizer
from tiny import TEMPLATE, add_word_tokenizer, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DeepSeek-V2 checkpoint with a WordLevel tokenizer.json and a chat template."""
    path, _ = make_checkpoint(tmp_path_factory.mktemp("cli"), "deepseek_v2")
    add_word_tokenizer(path)
    return path


def cli(capsys, *argv):
    rc = main(["generate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected(path, prompts, n, chat=False):
    """What the CLI should print: jaxmodels.generate on the tokenized batch, decoded."""
    model = jaxmodels.from_pretrained(path, progress=False)
    tok = OurTokenizer.from_checkpoint(path)
    enc = [tok.apply_chat_template([{"role": "user", "content": p}]) if chat else tok.encode(p) for p in prompts]
    eos = list(model.config.eos_token_ids)
    pad = model.config.pad_token_id
    ids, mask = tok.batch(enc, pad)
    out = jaxmodels.generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
    return [continuation(tok, e, [t for t in row[ids.shape[1]:] if t not in eos and t != pad])
            for e, row in zip(enc, out)]


def test_generate_prompt_streams_the_greedy_completion(checkpoint, capsys):
    rc, out, err = cli(capsys, "--model", checkpoint, "--prompt", "the cat sat on", "--max-new-tokens", "6")
    assert rc == 0, err
    want = expected(checkpoint, ["the cat sat on"], 6)[0]
    assert want.strip() and want.startswith(" ")  # the word-level tokenizer's joining space is kept
    assert out == "the cat sat on" + want + "\n"  # the prompt is echoed, then its continuation
    rc, out, err = cli(capsys, "--model", checkpoint, "--prompt", "the cat sat on", "--max-new-tokens", "6",
                       "--no-echo")
    assert rc == 0 and out == want + "\n"


def test_chat_template_matches_transformers(checkpoint, capsys):
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": "hello world how are you"}]
    ref = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    ours = OurTokenizer.from_checkpoint(checkpoint).apply_chat_template(messages)
    assert ours == list(ref)
    rc, out, err = cli(capsys, "--model", checkpoint, "--chat", "--prompt", "hello world how are you",
                       "--max-new-tokens", "5", "--no-stream")
    assert rc == 0, err
    assert out == "hello world how are you" + expected(checkpoint, ["hello world how are you"], 5, chat=True)[0] + "\n"


def test_prompt_file_runs_one_batch(checkpoint, capsys, tmp_path):
    prompts = ["the dog ran", "birds sang over green hills", "a red ball"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n\n")
    from jaxmodels.generate import steps
    before = steps.generate_program()._cache_size()
    rc, out, err = cli(capsys, "--model", checkpoint, "--prompt-file", str(file), "--max-new-tokens", "4")
    assert rc == 0, err
    assert steps.generate_program()._cache_size() <= before + 1  # one batched program, not one per prompt
    want = expected(checkpoint, prompts, 4)
    assert out == "".join(f"=== [{i}] {p}\n{w}\n" for i, (p, w) in enumerate(zip(prompts, want)))


def test_clear_errors(checkpoint, capsys, tmp_path):
    rc, _, err = cli(capsys, "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert rc == 2 and "does not exist" in err and "omit --model" in err
    bare, _ = make_checkpoint(tmp_path, "stablelm")  # weights, but no tokenizer.json
    rc, _, err = cli(capsys, "--model", bare, "--prompt", "hi")
    assert rc == 2 and "tokenizer.json" in err
    rc, _, err = cli(capsys, "--model", checkpoint, "--prompt", "the cat", "--temperature", "0.7", "--top-p", "0")
    assert rc == 2 and "--top-p" in err
    rc, _, err = cli(capsys, "--prompt", "hi", "--max-new-tokens", "5000")
    assert rc == 2 and "max_position_embeddings" in err
    os.remove(os.path.join(checkpoint, "tokenizer_config.json"))
    try:
        rc, _, err = cli(capsys, "--model", checkpoint, "--chat", "--prompt", "hi")
        assert rc == 2 and "chat template" in err
    finally:
        with open(os.path.join(checkpoint, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                       "pad_token": "[PAD]", "unk_token": "[UNK]", "chat_template": TEMPLATE}, f)


@pytest.mark.slow  # a subprocess
def test_tiny_random_model_runs_offline(capsys):
    """`--model tiny-random`: a random DeepSeek-V3 built in memory with the byte tokenizer (no files)."""
    from jaxmodels.generate_cli import TINY_RANDOM, tiny_random_model
    rc, out, err = cli(capsys, "--model", TINY_RANDOM, "--prompt", "Hello", "--max-new-tokens", "8", "--no-stream",
                       "--no-echo")
    assert rc == 0, err
    model, tok = tiny_random_model()
    ids = np.asarray([tok.encode("Hello")])
    gen = jaxmodels.generate(model, ids, max_new_tokens=8)
    new = [t for t in gen[0, ids.shape[1]:] if t not in model.config.eos_token_ids and t != model.config.pad_token_id]
    assert out == continuation(tok, list(ids[0]), new) + "\n"
    # ... and the real entry point, in a fresh process, with sampling and chat.
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "jaxmodels.cli", "generate", "--model", TINY_RANDOM, "--prompt", "Hi",
                           "--chat", "--temperature", "0.8", "--top-k", "20", "--max-new-tokens", "6"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Hi") and proc.stdout.endswith("\n")


class _ByteTok:
    """A stand-in tokenizer: one id per byte, decoded with errors='replace' like byte-level BPE."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streaming_never_prints_half_a_character():
    import io

    from jaxmodels.generate_cli import _Printer
    text = "x = 'π ≈ 3.14 😀'\n".encode()
    buf = io.StringIO()
    printer = _Printer(_ByteTok(), eos={0}, pad=0, out=buf, prompt_ids=list(b"# "))
    seen = []
    for i, b in enumerate(text):
        printer(i, [b])
        seen.append(buf.getvalue())
    assert buf.getvalue() == text.decode()
    assert all("\ufffd" not in s for s in seen)  # a multi-byte character appears only once whole
    printer(len(text), [0])  # EOS ends the row
    printer(len(text) + 1, [ord("y")])
    assert buf.getvalue() == text.decode()
