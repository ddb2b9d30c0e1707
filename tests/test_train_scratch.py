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


def _mtp_run(tmp_path, bias_update_rate):
    from jaxmodels.train import TrainConfig, Trainer

    path = os.path.join(tmp_path, "scratch-mtp")
    CONFIG_CLASSES["deepseek_v3"](**TINY["deepseek_v3"], initializer_range=0.02,
                                  num_nextn_predict_layers=1).save_pretrained(path)
    add_word_tokenizer(path)
    cfg = TrainConfig(model=path, data=_data(tmp_path), out=os.path.join(tmp_path, "run-mtp"), steps=3,
                      batch_size=2, seq_len=32, lr=1e-2, warmup=0, init_from_config=True, mtp_loss_weight=0.3,
                      bias_update_rate=bias_update_rate, dtype="float32", progress=False)
    trainer = Trainer(cfg)
    for _ in range(3):
        m = trainer.step()
    assert "mtp_loss" in m and math.isfinite(m["mtp_loss"])
    trainer.save(wait=True)
    return trainer


def test_from_scratch_with_mtp_trains_and_exports_the_mtp_layer(tmp_path):
    import jaxmodels
    from jaxmodels.layers.mtp import num_mtp_layers
    from jaxmodels.train import export_run

    trainer = _mtp_run(tmp_path, bias_update_rate=0.0)
    out = export_run(trainer.config.out, os.path.join(tmp_path, "hf"), progress=False)
    loaded = jaxmodels.from_pretrained(out, progress=False)
    assert num_mtp_layers(loaded) == 1
    ids = np.arange(3, 19)[None]
    np.testing.assert_allclose(np.asarray(loaded(ids).logits), np.asarray(trainer.model()(ids).logits), atol=1e-5)


def test_mtp_routing_bias_keeps_its_shape_under_balancing(tmp_path):
    from jaxmodels.train import export_run

    trainer = _mtp_run(tmp_path, bias_update_rate=1e-3)
    bias = trainer.state["buffers"]["model"]["mtp_layers"]["layers"]["mlp"]["gate"]["e_score_correction_bias"]
    assert bias.shape == (1, TINY["deepseek_v3"]["n_routed_experts"]), bias.shape
    main = trainer.state["buffers"]["model"]["moe_layers"]["layers"]["mlp"]["gate"]["e_score_correction_bias"]
    assert np.abs(np.asarray(main.get_value() if hasattr(main, "get_value") else main)).max() > 0  # balanced
    export_run(trainer.config.out, os.path.join(tmp_path, "hf"), progress=False)
