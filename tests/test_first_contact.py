"""What a new user meets first at the command line (issue 25), each command run as the user runs it: in a
fresh process. Help shows defaults; `generate` checks its flags before loading and never prints an error on
the echoed prompt's line; `train` exits with one line and leaves no empty folders and no Orbax traceback,
`--resume` needs only --out and says where it resumed, Ctrl-C during the first step's compile exits cleanly
and claims no checkpoint that does not exist."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tiny import WORDS, add_word_tokenizer, make_checkpoint

pytestmark = pytest.mark.slow  # every test here starts `python -m jaxmodels.cli` subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    return env


def jaxmodels(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxmodels.cli", *map(str, argv)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def one_line_error(proc, rc=2) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == rc, (proc.returncode, err[-3000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-3000:]
    return err


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    path, _ = make_checkpoint(root, "stablelm")
    add_word_tokenizer(path)
    rng = np.random.default_rng(0)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS[:40], rng.integers(3, 20)))}) + "\n"
                            for _ in range(60)))
    return dict(root=root, ckpt=path, data=str(data))


def train_argv(ws, out, steps, save_every, *extra):
    return ["train", "--model", ws["ckpt"], "--data", ws["data"], "--out", out, "--steps", steps, "--batch-size", 4,
            "--seq-len", SEQ, "--lr", "1e-2", "--warmup", 1, "--log-every", 1, "--save-every", save_every,
            "--dtype", "float32", *extra]


def test_help_shows_the_defaults():
    text = jaxmodels("train", "--help").stdout
    for flag, default in (("--batch-size", "8"), ("--seq-len", "1024"), ("--lr", "2e-05"), ("--warmup", "100"),
                          ("--save-every", "500"), ("--keep", "3"), ("--remat", "save_matmuls")):
        block = text.split(flag, 2)[-1].split("\n  --")[0]  # the option's own help lines
        assert f"(default: {default})" in " ".join(block.split()), (flag, block)
    text = " ".join(jaxmodels("generate", "--help").stdout.split())
    for default in ("(default: 64)", "(default: 0 = all)", "sampling seed (default: 0)", "'def fib(n):'"):
        assert default in text, default


def test_generate_checks_flags_before_loading(tmp_path):
    # The flag is wrong and the model does not exist: the flag is reported (it is checked first).
    err = one_line_error(jaxmodels("generate", "--model", tmp_path / "missing", "--temperature", "-1"))
    assert "--temperature must be >= 0" in err, err
    err = one_line_error(jaxmodels("generate", "--max-new-tokens", "0"))
    assert "--max-new-tokens must be >= 1" in err, err
    err = one_line_error(jaxmodels("generate", "--prompt-file", tmp_path / "prompts.txt"))
    assert "--prompt-file" in err and "omit --model" not in err, err
    # An error found once the prompt is echoed (the embedded model's 2048 positions) starts its own line.
    proc = jaxmodels("generate", "--prompt", "def f(x):", "--max-new-tokens", "5000")
    err = one_line_error(proc)
    assert proc.stdout == "def f(x):\n" and err.startswith("jaxmodels generate: error:"), (proc.stdout, err)


def test_train_errors_leave_no_traceback_and_no_folders(ws, tmp_path):
    """A run directory whose first run stopped before its first checkpoint (train_config.json, no
    checkpoint): --resume is one line, every time (Orbax's cleanup thread used to print a traceback at exit
    3 times in 4), and leaves no checkpoints/ folder; a model that does not exist leaves no run folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(dict(model=ws["ckpt"], data=ws["data"], out=str(run), steps=2,
                                                            batch_size=4, seq_len=SEQ)))
    for _ in range(3):
        err = one_line_error(jaxmodels("train", "--out", run, "--resume", "--quiet"))
        assert "no complete checkpoint" in err, err
        assert sorted(os.listdir(run)) == ["train_config.json"]
    fresh = tmp_path / "fresh"
    err = one_line_error(jaxmodels("train", "--model", tmp_path / "nope", "--data", ws["data"], "--out", fresh,
                                   "--steps", 2, "--quiet"))
    assert "does not exist" in err and not fresh.exists(), err
    err = one_line_error(jaxmodels("train", "--out", tmp_path / "other", "--steps", 2, "--quiet"))
    assert "--model is required" in err, err


def test_resume_needs_only_out_and_says_where_it_resumed(ws, tmp_path):
    out = tmp_path / "run"
    proc = jaxmodels(*train_argv(ws, out, 2, 2, "--quiet"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = jaxmodels("train", "--out", out, "--resume", "--steps", 3, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stderr, proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["batch_size"] == 4 and saved["seq_len"] == SEQ  # what the resumed run used (not the defaults)


def test_ctrl_c_during_the_first_compile_exits_cleanly(ws, tmp_path):
    """SIGINT while the first step compiles: the step finishes, the run stops with 130 and one line that
    claims no checkpoint (none was saved), and no empty checkpoints/ folder stays (it used to segfault after
    saying the last complete checkpoint was kept)."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "jaxmodels.cli", *map(str, train_argv(ws, out, 200, 500))],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        end = time.time() + 240
        while "training:" not in log.read_text():  # the bar is up: the first step's compile starts now
            assert proc.poll() is None and time.time() < end, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 130, (rc, text[-3000:])
    last = text.strip().splitlines()[-1]
    assert last.startswith("jaxmodels train: interrupted at step") and "nothing to resume" in last, last
    assert "kept" not in text and "Traceback" not in text and "Segmentation" not in text, text[-3000:]
    assert not (out / "checkpoints").exists()


def test_export_says_what_transformers_reports_for_the_mtp_layer(tmp_path):
    """The embedded model carries an MTP layer: `export` says that transformers will list its tensors as
    UNEXPECTED and how to leave them out; `--no-mtp` does, and transformers then loads every tensor. Neither
    prints Orbax's absl warnings about its read-only checkpoint manager."""
    import torch
    import transformers

    import jaxmodels as jm
    from jaxmodels.train import TrainConfig, Trainer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(model=jm.default_model_dir(), data=str(data), out=str(run), steps=1, batch_size=2,
                                  seq_len=32, lora_rank=2, save_every=1, dtype="float32", bias_update_rate=0.0,
                                  progress=False))
    trainer.run()
    trainer.close()
    layers = json.loads(open(os.path.join(jm.default_model_dir(), "config.json")).read())["num_hidden_layers"]
    for flags, out in (((), tmp_path / "with"), (("--no-mtp",), tmp_path / "without")):
        proc = jaxmodels("export", run, out, *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "CheckpointManagerOptions" not in proc.stderr and "read only" not in proc.stderr, proc.stderr  # absl
        _, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        if flags:
            assert not info["unexpected_keys"] and "UNEXPECTED" not in proc.stderr, (info, proc.stderr)
        else:
            assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{layers}.")
                                                   for k in info["unexpected_keys"]), info
            assert "UNEXPECTED" in proc.stderr and "--no-mtp" in proc.stderr, proc.stderr
