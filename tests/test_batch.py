"""Batch inference: the continuous-batching engine against `jaxmodels.generate` on each prompt alone, its compile
count, and `jaxmodels batch` / `jaxmodels.batch_generate` (streamed JSONL in and out, restart, bad lines)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxmodels
from jaxmodels.generate import GenerationError
from jaxmodels.generate.engine import Engine, Request
from tiny import count_compiles, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = ["deepseek_v2", "deepseek_v3", "stablelm"]
BUCKETS = (8, 16)  # a 16-token row holds several short prompts; longer prompts are prefilled in 16-token chunks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        path, _ = make_checkpoint(tmp_path_factory.mktemp(fam), fam)
        out[fam] = jaxmodels.from_pretrained(path, progress=False)
    return out


def workload(rng_seed, lengths, new_tokens, vocab=96, **kw):
    rng = np.random.default_rng(rng_seed)
    return [Request(i, rng.integers(3, vocab, n).tolist(), max_new_tokens=m, **kw)
            for i, (n, m) in enumerate(zip(lengths, new_tokens))]


def alone(model, req, eos):
    """`jaxmodels.generate` on this prompt alone, cut at its first EOS (the EOS itself not kept)."""
    out = jaxmodels.generate(model, np.asarray([req.tokens]), max_new_tokens=req.max_new_tokens,
                             eos_token_id=eos, pad_token_id=0)[0, len(req.tokens):].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[:i], "eos"
    return out, "length"


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_equals_generate_alone_and_compiles_once(tiny, family):
    """3 slots, 8 requests of 2-30 tokens (packed rows, chunked prompts) finishing at different steps (token
    limits and an EOS): every completion is generate's on that prompt alone. A second workload of other
    lengths, counts and limits compiles nothing new."""
    model = tiny[family]
    first = workload(0, [3, 9, 17, 5, 30, 12, 7, 2], [5, 8, 3, 12, 6, 9, 4, 10])
    # An EOS that some requests meet mid-way: the 3rd token of request 3's greedy continuation.
    eos = [alone(model, first[3], [])[0][2]]
    engine = Engine(model, slots=3, cache_len=64, buckets=BUCKETS, eos=eos)
    with count_compiles() as compiles:
        got = list(engine.run(first))
    programs = {k: v for k, v in compiles.items() if "_prefill_impl" in k or "_decode_impl" in k}
    # one prefill program per bucket + the chunk program, one decode program per read phase (greedy only here)
    assert sum(programs.values()) <= len(BUCKETS) + 1 + len(engine.read_lens), compiles
    assert sorted(r.id for r in got) == list(range(8))
    assert engine.stats["most_prompts_in_a_row"] > 1  # several prompts share a prefill row
    reasons = set()
    for r in got:
        want, reason = alone(model, first[r.id], eos)
        assert (r.tokens, r.finish_reason) == (want, reason), (r.id, r.tokens, want)
        assert r.prompt_tokens == len(first[r.id].tokens)
        reasons.add(reason)
    assert reasons == {"eos", "length"}
    finish_order = [r.id for r in got]
    assert finish_order != sorted(finish_order)  # results come as requests end, not in input order

    second = workload(1, [14, 1, 25, 6, 6, 11, 3, 19, 4, 8, 2], [2, 7, 11, 1, 5, 3, 9, 6, 4, 2, 8])
    with count_compiles() as compiles:
        got = list(engine.run(iter(second)))
    assert not compiles, f"a second workload compiled {dict(compiles)}"
    for r in got:
        assert (r.tokens, r.finish_reason) == alone(model, second[r.id], eos), r.id


def test_engine_speculative_equals_greedy():
    """With DeepSeek-V3's MTP layer (speculative=True) every slot verifies a draft per step: 1 or 2 tokens, the
    same tokens as generate alone (packed rows, chunked prompts whose MTP pass spans the chunks), in fewer steps."""
    from test_mtp import drafting_model

    model = drafting_model()
    reqs = workload(4, [3, 9, 17, 5, 30, 12], [12, 20, 6, 16, 9, 14])
    plain = Engine(model, slots=3, cache_len=64, buckets=BUCKETS, eos=[])
    spec = Engine(model, slots=3, cache_len=64, buckets=BUCKETS, eos=[], speculative=True)
    got = {r.id: r for r in spec.run(reqs)}
    ref = {r.id: r for r in plain.run(reqs)}
    for i, req in enumerate(reqs):
        want = alone(model, req, [])
        assert (got[i].tokens, got[i].finish_reason) == want, (i, got[i].tokens, want)
        assert ref[i].tokens == want[0]
    assert spec.stats["decode_steps"] < 0.8 * plain.stats["decode_steps"], (spec.stats, plain.stats)
    bad = list(spec.run([Request("s", [5, 6], temperature=1.0)]))
    assert bad[0].finish_reason == "error" and "greedily" in bad[0].error
    with pytest.raises(GenerationError, match="MTP"):
        Engine(_no_mtp(), speculative=True)


def _no_mtp():
    from flax import nnx

    from jaxmodels.config import DeepseekV3Config
    from tiny import TINY
    cfg = DeepseekV3Config.from_hf({**TINY["deepseek_v3"], "model_type": "deepseek_v3"})
    return jaxmodels.CausalLM(cfg, rngs=nnx.Rngs(0))


def test_engine_sampling_is_per_request(tiny):
    """A sampled request's tokens depend on its seed and prompt only, not on its slot or its neighbours; top_k=1
    sampling is greedy; per-request temperatures mix with greedy requests in one decode step."""
    model = tiny["stablelm"]
    reqs = workload(2, [5, 9, 4, 12], [8, 8, 8, 8], temperature=1.5, seed=7)
    reqs[1].temperature = 0.0
    reqs[2].top_k, reqs[2].temperature = 1, 3.0
    reqs[3].seed = 8
    engine = Engine(model, slots=4, cache_len=64, buckets=BUCKETS, eos=[])
    together = {r.id: r.tokens for r in engine.run(reqs)}
    lone = {r.id: r.tokens for r in Engine(model, slots=2, cache_len=64, buckets=BUCKETS, eos=[]).run([reqs[0]])}
    assert together[0] == lone[0]
    assert together[1] == alone(model, reqs[1], [])[0]  # greedy next to sampled rows
    assert together[2] == alone(model, reqs[2], [])[0]  # top_k=1 is greedy
    reqs[3].tokens = reqs[0].tokens  # same prompt, other seed: other draws
    again = {r.id: r.tokens for r in engine.run([reqs[0], reqs[3]])}
    assert again[0] == together[0] and again[3] != again[0]


def test_engine_rejects_per_request(tiny):
    """A prompt the cache cannot hold, an empty prompt or a bad sampling value ends that request with an error
    record; the others run."""
    model = tiny["stablelm"]
    reqs = workload(3, [70, 4, 0, 5], [4, 4, 4, 4])
    reqs[3].top_p = 0.0
    got = {r.id: r for r in Engine(model, slots=2, cache_len=64, buckets=BUCKETS, eos=[]).run(reqs)}
    assert got[0].finish_reason == "error" and "cache holds 64" in got[0].error
    assert got[2].finish_reason == "error" and "empty" in got[2].error
    assert got[3].finish_reason == "error" and "top_p" in got[3].error
    assert got[1].tokens == alone(model, reqs[1], [])[0]


# ----------------------------------------------------------------------------------------------------
# batch_generate and `jaxmodels batch`
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny StableLM checkpoint with a WordLevel tokenizer and a chat template (max_position_embeddings 64)."""
    from tiny import add_word_tokenizer

    path, _ = make_checkpoint(tmp_path_factory.mktemp("batch"), "stablelm")
    add_word_tokenizer(path)
    return path


def reference(model, tok, ids, n):
    """generate's greedy completion text and token count for one prompt, with the EOS ids batch_generate uses."""
    from jaxmodels.tokenizer import continuation

    eos = set(model.config.eos_token_ids) | {tok.eos_token_id}
    out = jaxmodels.generate(model, np.asarray([ids]), max_new_tokens=n, eos_token_id=sorted(eos),
                             pad_token_id=0)[0, len(ids):].tolist()
    new = []
    for t in out:
        if t in eos:
            return continuation(tok, ids, new), len(new), "eos"
        new.append(t)
    return continuation(tok, ids, new), len(new), "length"


def test_batch_generate_prompts_messages_stop(checkpoint):
    from jaxmodels.tokenizer import Tokenizer

    model = jaxmodels.from_pretrained(checkpoint, progress=False)
    tok = Tokenizer.from_checkpoint(checkpoint)
    prompts = ["the cat sat on", "hello world how are you today", "a red ball", "birds sang over green hills"]
    reqs = [{"id": f"p{i}", "prompt": p, "max_new_tokens": 4 + 3 * i} for i, p in enumerate(prompts)]
    msgs = [{"role": "user", "content": "hello world"}]
    reqs.append({"id": 7, "messages": msgs, "max_new_tokens": 6})
    full, _, _ = reference(model, tok, tok.encode(prompts[3]), 13)
    word = full.split()[3]  # a stop string the 4th prompt's greedy continuation meets
    reqs.append({"id": "stop", "prompt": prompts[3], "max_new_tokens": 13, "stop": [word, "zzz-never"]})
    got = {r["id"]: r for r in jaxmodels.batch_generate(model, tok, iter(reqs), slots=2, buckets=(16, 32))}
    assert set(got) == {"p0", "p1", "p2", "p3", 7, "stop"}
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        text, n, reason = reference(model, tok, ids, 4 + 3 * i)
        assert got[f"p{i}"] == {"id": f"p{i}", "completion": text, "finish_reason": reason, "prompt_tokens": len(ids),
                                "completion_tokens": n}
    ids = tok.apply_chat_template(msgs)
    assert got[7]["completion"] == reference(model, tok, ids, 6)[0] and got[7]["prompt_tokens"] == len(ids)
    assert got["stop"]["finish_reason"] == "stop"
    assert got["stop"]["completion"] == full[:full.index(word)]


def batch_cli(*argv):
    from jaxmodels.cli import main

    return main(["batch", *argv])


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_batch_cli_restart_bad_lines_and_errors(checkpoint, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [json.dumps({"id": i, "prompt": "the cat sat on a mat " * (1 + i % 3), "max_new_tokens": 3 + i % 4})
            for i in range(6)]
    rows.insert(2, "{not json")
    rows.insert(4, json.dumps({"prompt": "no id"}))
    rows.append(json.dumps({"id": "long", "prompt": "the cat " * 40}))  # 80 words: more than the 64-entry cache
    rows.append(json.dumps({"id": "bad-field", "prompt": "the cat", "top_p": 2}))
    inp.write_text("\n".join(rows) + "\n")
    args = ["--model", checkpoint, "--input", str(inp), "--output", str(out), "--slots", "3", "--no-progress"]
    assert batch_cli(*args, "--on-bad-line", "fail") == 2
    err = capsys.readouterr().err
    assert f"{inp}:3: not JSON" in err
    assert batch_cli(*args) == 0
    err = capsys.readouterr().err
    assert f"{inp}:3: not JSON" in err and f'{inp}:5: not a JSON object with an "id"' in err
    assert f"{inp}:10:" in err and "top_p" in err  # a bad field, with its line number
    got = lines(out)
    by_id = {r["id"]: r for r in got}
    assert set(by_id) == {0, 1, 2, 3, 4, 5, "long", "bad-field"}
    assert "cache holds 64" in by_id["long"]["error"]
    assert all(set(r) == {"id", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}
               for r in got if "error" not in r)
    # A restart after a kill mid-write: the torn last line is dropped, finished ids are skipped, the rest run.
    keep = [r for r in got if r["id"] in (0, 3)]
    out.write_text("".join(json.dumps(r) + "\n" for r in keep) + '{"id": 5, "compl')
    assert batch_cli(*args) == 0
    assert "skipped 2 requests" in capsys.readouterr().err
    again = lines(out)
    assert sorted(map(str, (r["id"] for r in again))) == sorted(map(str, by_id))
    assert {r["id"]: r for r in again} == by_id
    # Everything done: a third run appends nothing.
    assert batch_cli(*args) == 0
    assert lines(out) == again


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **extra)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


@pytest.mark.slow
def test_batch_cli_survives_sigkill(checkpoint, tmp_path):
    """A real SIGKILL mid-job, then the same command again: every id exactly once, no torn line, and the same
    records as an uninterrupted run."""
    inp, out, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    words = "the cat sat on a mat and the dog ran to the red ball".split()
    with open(inp, "w") as f:
        for i in range(240):
            f.write(json.dumps({"id": i, "prompt": " ".join(words[i % 7:i % 7 + 3 + i % 5]),
                                "max_new_tokens": 2 + i % 9}) + "\n")
    cmd = [sys.executable, "-m", "jaxmodels.cli", "batch", "--model", checkpoint, "--input", str(inp), "--slots", "4",
           "--no-progress"]
    proc = subprocess.Popen(cmd + ["--output", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
    assert 10 <= partial < 240
    run = subprocess.run(cmd + ["--output", str(out)], env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"skipped {partial} requests" in run.stderr
    assert batch_cli("--model", checkpoint, "--input", str(inp), "--output", str(ref), "--slots", "4",
                     "--no-progress") == 0
    text = out.read_text()
    assert text.endswith("\n")
    got = lines(out)
    assert sorted(r["id"] for r in got) == list(range(240))
    assert {r["id"]: r for r in got} == {r["id"]: r for r in lines(ref)}


MESH_SCRIPT = """
import json, sys
import numpy as np
import jax
import jaxmodels
from jaxmodels import sharding
from jaxmodels.generate.engine import Engine, Request
assert jax.device_count() == 8, jax.devices()
path = sys.argv[1]
rng = np.random.default_rng(0)
reqs = [Request(i, rng.integers(3, 96, int(n)).tolist(), max_new_tokens=int(m))
        for i, (n, m) in enumerate(zip(rng.integers(1, 30, 20), rng.integers(1, 12, 20)))]
one = jaxmodels.from_pretrained(path, progress=False)
ref = {r.id: r.tokens for r in Engine(one, slots=8, cache_len=64, buckets=(16, 32), eos=[]).run(reqs)}
mesh = sharding.make_mesh(data=8)
model = jaxmodels.from_pretrained(path, progress=False, mesh=mesh)
engine = Engine(model, slots=8, cache_len=64, buckets=(16, 32), eos=[])
got = {r.id: r.tokens for r in engine.run(reqs)}
cache = engine._cache[0]
c = next(iter(cache.values()))
buf = c.latent if hasattr(c, "latent") else c.kv
print(json.dumps({"equal": got == ref, "cache_spec": str(buf.sharding.spec),
                  "shards": len({s.device.id for s in buf.addressable_shards}), "n": len(got)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v2", "stablelm"])
def test_engine_data_parallel_slots_equal_one_device(family, tmp_path):
    """Slots split over 8 (simulated CPU) devices with --mesh data=8 give the single-device tokens."""
    path, _ = make_checkpoint(tmp_path, family)
    run = subprocess.run([sys.executable, "-c", MESH_SCRIPT, path], capture_output=True, text=True, timeout=600,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["n"] == 20 and res["equal"], res
    assert "data" in res["cache_spec"] and res["shards"] == 8, res
