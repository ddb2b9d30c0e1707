"""Training from scratch: `jaxmodels train --init-from-config` on a directory with config.json + tokenizer only."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tiny import CONFIG_CLASSES, TINY, add_word_tokenizer


def _scratch_dir(tmp_path) -> str:
    """config.json (a tiny DeepSeek-V3) and a tokenizer, no weights."""
    path = os.path.join(tmp_path, "scratch")
    CONFIG_CLASSES["deepseek_v3"](**TINY["deepseek_v3"], initializer_range=0.02).save_pretrained(path)
    add_word_tokenizer(path)
    assert not any(n.endswith(".safetensors") for n in os.listdir(path))
    return path


def _data(tmp_path) -> str:
    rng = np.random.default_rng(0)
    phrases = ["the cat sat on a mat", "the dog ran to the red ball", "birds sang over green hills"]
    file = os.path.join(tmp_path, "train.jsonl")
    with open(file, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(phrases, 3))}) + "\n")
    return file


def test_from_scratch_run_starts_at_uniform_loss_and_learns(tmp_path):
    from jaxmodels.train import TrainConfig, Trainer

    model_dir = _scratch_dir(tmp_path)
    cfg = TrainConfig(model=model_dir, data=_data(tmp_path), out=os.path.join(tmp_path, "run"), steps=40,
                      batch_size=4, seq_len=32, lr=1e-2, warmup=2, init_from_config=True, dtype="float32",
                      progress=False)
    trainer = Trainer(cfg)
    first = trainer.step()
    # A fresh init (std 0.02) predicts nearly uniformly: the loss is ln(vocab), not a loaded model's.
    assert abs(first["loss"] - math.log(96)) < 0.1, first["loss"]
    last = [trainer.step()["loss"] for _ in range(39)][-5:]
    assert np.mean(last) < 0.5 * first["loss"], (first["loss"], last)
    trainer.save(wait=True)
    assert trainer.checkpoints.latest_step() == 40


def test_from_scratch_flag_parses_and_rejects_lora(tmp_path):
    import argparse

    from jaxmodels.train.cli import add_arguments, config_from_args
    from jaxmodels.train.config import TrainError

    p = argparse.ArgumentParser()
    add_arguments(p)
    data = _data(tmp_path)
    args = p.parse_args(["--model", "m", "--data", data, "--out", str(tmp_path), "--steps", "1", "--init-from-config"])
    assert config_from_args(args).init_from_config
    with pytest.raises(TrainError, match="init-from-config"):
        config_from_args(p.parse_args(["--model", "m", "--data", data, "--out", str(tmp_path), "--steps", "1",
                                       "--init-from-config", "--lora-rank", "4"]))
