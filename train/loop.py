"""The fine-tuning loop: `train(config)` for the CLI, `Trainer` for notebooks that drive it step by step.

    trainer = Trainer(TrainConfig(model="ckpt", data="train.jsonl", out="runs/x", steps=100))
    for _ in range(10):
        print(trainer.step())          # one optimizer step -> metrics dict
    trainer.save(); model = trainer.model()   # the current weights as a jaxmodels model
    trainer.run()                      # the rest: logging, eval, checkpoints, progress bar

Run directory layout: `train_config.json` (the options), `metrics.jsonl`, `checkpoints/<step>/` (Orbax),
`tensorboard/` (when a writer is installed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxmodels import distributed, sharding
from jaxmodels.config import DeepseekConfig
from jaxmodels.layers.linear import LoRAParam
from jaxmodels.layers.mtp import num_mtp_layers
from jaxmodels.train import step as steplib
from jaxmodels.train.checkpoint import Checkpoints
from jaxmodels.train.config import TrainConfig, TrainError, check_out_dir
from jaxmodels.train.data import DataError, TrainData
from jaxmodels.train.lora import add_lora, default_targets, lora_config, peft_unwritable
from jaxmodels.train.metrics import MetricsLog, flops_per_token, peak_flops
from jaxmodels.train.optim import optimizer
from jaxmodels.units import DTYPES

log = logging.getLogger("jaxmodels.train")

CONFIG_FILE = "train_config.json"


def model_fingerprint(path: str) -> str:
    """The checkpoint's identity: its config.json bytes and the names and sizes of its weight files."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as f:
                h.update(f.read())
        elif name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
    return h.hexdigest()[:16]


def build_mesh(spec: str | None, dcn: str | None = None):
    """--mesh 'fsdp=4,expert=2' -> a Mesh over all devices; axes not named are 1 and fsdp takes the rest.
    --dcn-mesh 'data=2': the axes across TPU slices / GPU nodes; --mesh is then one slice's (distributed.py)."""
    try:
        return distributed.make_mesh(sharding.parse_mesh(spec or ""), sharding.parse_mesh(dcn or ""))
    except sharding.ShardingError as e:
        raise TrainError(f"--mesh {spec!r}" + (f" --dcn-mesh {dcn!r}" if dcn else "") + f": {e}") from None


class Trainer:
    """Everything a run needs, built once; `step()` advances it, `run()` runs it to the end."""

    def __init__(self, config: TrainConfig, *, model=None):
        created = not os.path.isdir(config.out)
        check_out_dir(config.out)
        self.checkpoints = None
        try:
            self._build(config, model)
        except BaseException:  # (KeyboardInterrupt too) no Orbax thread left running, no empty folders left
            if self.checkpoints is not None:
                self.checkpoints.close()
            _remove_if_empty(os.path.join(config.out, "checkpoints"))
            if created:
                _remove_if_empty(config.out)
            raise

    def _build(self, config: TrainConfig, model) -> None:
        self.config = cfg = config
        self.mesh = build_mesh(cfg.mesh, cfg.dcn_mesh)
        self.primary = distributed.is_primary()  # writes the run's files; every process writes its shards
        progress = cfg.progress and self.primary
        self.checkpoints = Checkpoints(cfg.out, keep=cfg.keep)
        latest = self.checkpoints.latest_step()
        if cfg.resume and latest is None:
            raise TrainError(f"--resume: {cfg.out} has no complete checkpoint to resume from; start without --resume")
        if not cfg.resume and latest is not None:
            raise TrainError(f"{cfg.out} already holds checkpoints (latest step {latest}); pass --resume to continue "
                             "that run, or choose a new --out")

        # ---- model ----
        from jaxmodels.convert.hf import from_pretrained, resolve_checkpoint
        self.model_path = resolve_checkpoint(cfg.model) if model is None else cfg.model
        param_dtype = DTYPES[(cfg.param_dtype or ("bf16" if cfg.lora else "float32")).lower()]
        if model is None and cfg.init_from_config:
            model = init_from_config(self.model_path, param_dtype, self.mesh, seed=cfg.seed,
                                     mtp=bool(cfg.mtp_loss_weight))
        elif model is None:
            model = from_pretrained(self.model_path, param_dtype, mesh=self.mesh, progress=progress)
        else:
            model = sharding.shard_model(model, self.mesh)
        mcfg = model.config
        if cfg.seq_len > mcfg.max_position_embeddings:
            raise TrainError(f"--seq-len {cfg.seq_len} is above the model's max_position_embeddings "
                             f"({mcfg.max_position_embeddings}); use a shorter --seq-len")
        steplib.check_batch_fits_mesh(cfg.batch_size, self.mesh)
        if cfg.mtp_loss_weight and not num_mtp_layers(model):
            raise TrainError(f"--mtp-loss-weight {cfg.mtp_loss_weight}: {self.model_path} has no multi-token-"
                             "prediction layer (num_nextn_predict_layers with MTP weights); drop the flag")
        model = model.with_options(compute_dtype=DTYPES[cfg.dtype.lower()], remat=cfg.remat)
        self.task = "causal_lm" if model.head in ("causal_lm", "base") else model.head
        if cfg.lora:
            targets = cfg.lora_targets or default_targets(mcfg)
            if peft_unwritable(mcfg, targets):
                log.warning("--lora-targets %s: DeepSeek adapters on the dense / shared-expert MLP cannot be exported "
                            "with --adapter-only (peft reads those names as the routed experts); `jaxmodels export "
                            "RUN OUT` writes the merged model", ",".join(peft_unwritable(mcfg, targets)))
            add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2 * cfg.lora_rank, targets=targets,
                     seed=cfg.seed)
            model = sharding.shard_model(model, self.mesh)
        self.lora = lora_config(model) if cfg.lora else None

        # ---- data ----
        pad = mcfg.pad_token_id
        try:
            self.data = TrainData.from_jsonl(cfg.data, self.model_path, seq_len=cfg.seq_len, task=self.task,
                                             seed=cfg.seed, num_labels=None if self.task == "causal_lm" else
                                             mcfg.num_labels, pad_id=pad, progress=progress)
            self.eval_data = None if cfg.eval_data is None else TrainData.from_jsonl(
                cfg.eval_data, self.model_path, seq_len=cfg.seq_len, task=self.task, seed=cfg.seed,
                num_labels=None if self.task == "causal_lm" else mcfg.num_labels, pad_id=pad, progress=False)
            per_epoch = self.data.batches_per_epoch(cfg.batch_size)
        except DataError as e:
            raise TrainError(str(e)) from None
        self.total_steps = cfg.steps or max(1, int(cfg.epochs * per_epoch) // cfg.grad_accum)
        if progress:
            print(f"data: {self.data.describe()}; {per_epoch} batches of {cfg.batch_size} per epoch", file=sys.stderr)

        # ---- optimizer, state, compiled steps ----
        trainable = LoRAParam if cfg.lora else nnx.Param
        self.graphdef, params, self.frozen, buffers = steplib.split_model(model, trainable)
        self.tx, self.schedule = optimizer(cfg, self.total_steps)
        self.state = steplib.init_state(params, buffers, self.tx, self.mesh)
        self.opts = steplib.StepOptions(
            task=self.task, bias_update_rate=cfg.bias_update_rate if _has_routing_bias(mcfg) else 0.0,
            aux_loss_alpha=_aux_alpha(cfg, self.model_path), seq_aux=_seq_aux(cfg, self.model_path),
            mtp_loss_weight=cfg.mtp_loss_weight)
        self._step_fn, self._eval_fn = steplib.compile_steps(self.graphdef, self.tx, self.opts, self.state,
                                                             self.frozen)
        self.position = 0  # micro-batches consumed
        # Each process reads only the rows of a batch its devices hold.
        self.shard = steplib.process_shard(self.mesh, cfg.batch_size, micro=True)
        self.eval_shard = steplib.process_shard(self.mesh, cfg.batch_size, micro=False)
        self.identity = {"model": os.path.abspath(self.model_path) if os.path.isdir(self.model_path) else cfg.model,
                         "model_fingerprint": model_fingerprint(self.model_path) if os.path.isdir(self.model_path)
                         else None, "data_fingerprint": self.data.fingerprint, "lora": self.lora,
                         "task": self.task, "optimizer_dtype": jnp.dtype(DTYPES[cfg.optimizer_dtype.lower()]).name}
        self.flops_per_token = flops_per_token(model, cfg.seq_len, lora=cfg.lora)
        self.peak = peak_flops()
        if cfg.resume:
            self._resume(latest)
        elif self.primary:
            with open(os.path.join(cfg.out, CONFIG_FILE), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        self.metrics_log = MetricsLog(cfg.out, latest if cfg.resume else None, enabled=self.primary)

    # ---------------------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return int(self.state["step"])

    def model(self):
        """The current weights as a jaxmodels model (LoRA adapters included, not merged)."""
        return nnx.merge(self.graphdef, self.state["params"], self.frozen, self.state["buffers"])

    def _batch(self):
        k, b = self.config.grad_accum, self.config.batch_size
        parts = [self.data.batch(self.position + i, b, self.shard) for i in range(k)]
        self.position += k
        return sharding.shard_batch({n: np.stack([p[n] for p in parts]) for n in parts[0]}, self.mesh, micro=True,
                                    rows=b)

    def step(self) -> dict:
        """One optimizer step; returns its metrics (host floats; `expert_load` [moe layers, experts])."""
        start = time.perf_counter()
        batch = self._batch()
        lr = float(self.schedule(self.step_count))
        self.state, metrics = self._step_fn(self.state, self.frozen, batch)
        metrics = distributed.to_host(metrics)
        seconds = time.perf_counter() - start
        tokens = self.config.grad_accum * self.config.batch_size * self.config.seq_len
        out = {"step": self.step_count, "loss": float(metrics["loss"]), "lr": lr,
               "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens / seconds,
               "mfu": (tokens / seconds * self.flops_per_token / (self.peak * len(jax.devices())))
               if self.peak else None, "target_tokens": int(metrics["tokens"]),
               "accuracy": float(metrics["accuracy"])}
        if self.opts.aux_loss_alpha:
            out["aux_loss"] = float(metrics["aux_loss"])
        if "expert_load" in metrics:
            load = np.asarray(metrics["expert_load"], np.float64)  # [layers, experts]
            frac = load / np.maximum(load.sum(-1, keepdims=True), 1)
            out["expert_load"] = frac.mean(0)  # per expert, averaged over MoE layers
            out["expert_load_max_over_mean"] = float((frac.max(-1) * frac.shape[-1]).mean())
            out["expert_load_cv"] = float((frac.std(-1) / np.maximum(frac.mean(-1), 1e-12)).mean())
        if "mtp_loss" in metrics:
            out["mtp_loss"] = float(np.mean(metrics["mtp_loss"]))
            out["mtp_accuracy"] = float(np.mean(metrics["mtp_accuracy"]))
        return out

    def evaluate(self) -> dict:
        """Loss (and perplexity / accuracy) over --eval-data (or its first --eval-batches batches)."""
        if self.eval_data is None:
            return {}
        b = self.config.batch_size
        try:
            n = self.eval_data.batches_per_epoch(b)
        except DataError as e:
            raise TrainError(f"--eval-data: {e}") from None
        n = min(n, self.config.eval_batches or n)
        total, count, correct, mtp = 0.0, 0, 0, 0.0
        for i in range(n):
            batch = sharding.shard_batch(self.eval_data.batch(i, b, self.eval_shard), self.mesh, rows=b)
            out = distributed.to_host(self._eval_fn(self.state, self.frozen, batch))
            total, count, correct = total + float(out["loss_sum"]), count + int(out["tokens"]), \
                correct + int(out["correct"])
            mtp = mtp + np.asarray(out.get("mtp", 0.0), np.float64)
        loss = total / max(count, 1)
        result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_accuracy": correct / max(count, 1)}
        if np.ndim(mtp):  # per depth: CE, and top-1 accuracy = the greedy draft acceptance rate
            result["eval_mtp_loss"] = float(np.mean(mtp[:, 0] / np.maximum(mtp[:, 1], 1)))
            result["eval_mtp_acceptance"] = float(np.mean(mtp[:, 2] / np.maximum(mtp[:, 1], 1)))
        return result

    def save(self, wait: bool = False) -> None:
        meta = dict(self.identity, step=self.step_count, data_position=self.position, seed=self.config.seed,
                    seq_len=self.config.seq_len, batch_size=self.config.batch_size,
                    grad_accum=self.config.grad_accum)
        self.checkpoints.save(self.step_count, self.state, meta)
        if wait:
            self.checkpoints.wait()

    def _resume(self, step: int) -> None:
        meta = self.checkpoints.read_meta(step)
        for key, what in (("model_fingerprint", "model (config.json / weight files)"),
                          ("data_fingerprint", "training data (file, tokenizer or --seq-len)"),
                          ("lora", "LoRA setting (--lora-rank/--lora-alpha/--lora-targets)"), ("task", "task"),
                          ("optimizer_dtype", "--optimizer-dtype"),
                          ("batch_size", "--batch-size"), ("grad_accum", "--grad-accum"), ("seed", "--seed")):
            ours = self.identity.get(key, getattr(self.config, key, None))
            theirs = meta.get(key, "float32" if key == "optimizer_dtype" else None)  # (saved before the flag)
            if _norm(theirs) != _norm(ours):
                raise TrainError(f"--resume: the checkpoint in {self.config.out} was trained with a different {what} "
                                 f"({theirs!r} there, {ours!r} now); resume with the same settings or "
                                 "start a new --out")
        restored = self.checkpoints.restore(step, self.state)
        self.state = dict(self.state, **restored, step=jnp.asarray(step, jnp.int32))
        self.position = int(meta["data_position"])
        if self.primary:
            print(f"resumed from step {step} ({self.config.out})", file=sys.stderr)

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Trains to `steps`, logging every --log-every, evaluating every --eval-every, saving every
        --save-every and at the end. Returns the last logged metrics.

        Ctrl-C (SIGINT, in the main thread) stops the run after the step in progress, never inside it (an
        interrupt raised inside XLA's compile of the first step crashed the process), and raises Interrupted
        naming the last complete checkpoint, if any."""
        cfg = self.config
        last = {}
        bar = tqdm(total=self.total_steps, initial=self.step_count, desc="training", unit="step",
                   disable=not (cfg.progress and self.primary), dynamic_ncols=True)
        stop = _StopOnInterrupt()
        try:
            with stop:
                while self.step_count < self.total_steps and not stop.requested:
                    m = self.step()
                    s = m["step"]
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    if not math.isfinite(m["loss"]):
                        raise TrainError(f"the loss became {m['loss']} at step {s}; lower --lr or raise --warmup "
                                         "(the last checkpoint is untouched)")
                    record = None
                    if s % cfg.log_every == 0 or s == self.total_steps:
                        record = m
                    if self.eval_data is not None and (s % cfg.eval_every == 0 or s == self.total_steps):
                        record = dict(record or {"step": s}, **self.evaluate())
                    if record is not None:
                        self.metrics_log.write(record)
                        last = record
                    if s % cfg.save_every == 0 or s == self.total_steps:
                        self.save()
        finally:
            bar.close()
            self.checkpoints.wait()
            self.metrics_log.close()
        if stop.requested:
            raise Interrupted(self.step_count, self.checkpoints.latest_step())
        return last

    def close(self) -> None:
        """Waits for the last save and stops Orbax's background threads (before the interpreter exits:
        a manager left open can print a traceback from its cleanup thread at exit)."""
        self.checkpoints.close()
        _remove_if_empty(self.checkpoints.directory)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run between steps: `step` reached, `saved` the last complete checkpoint (None: none)."""

    def __init__(self, step: int, saved: int | None):
        super().__init__(step, saved)
        self.step, self.saved = step, saved


class _StopOnInterrupt:
    """Within the block, the first SIGINT only sets `requested` (the loop stops after the current step); a
    second one interrupts at once. Outside the main thread (where Python allows no signal handler) it does
    nothing."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C: the usual KeyboardInterrupt
        print("\nstopping after the current step (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)  # only succeeds on an empty folder
    except OSError:
        pass


def train(config: TrainConfig) -> Trainer:
    """Runs a whole fine-tuning job (`jaxmodels train`); returns the finished Trainer."""
    trainer = Trainer(config)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def init_from_config(path: str, dtype, mesh, *, seed: int = 0, mtp: bool = False):
    """Training from scratch: the model config.json in `path` describes, freshly initialised (normal with the
    config's initializer_range, created under jit with its final shardings); weight files there are ignored.
    mtp: build the config's multi-token-prediction layers too (num_nextn_predict_layers; only when their loss
    trains them, so an export never ships an untrained MTP layer)."""
    from jaxmodels.config import load_config
    from jaxmodels.model import init_model

    mcfg = load_config(path)
    if any(n.endswith(".safetensors") for n in os.listdir(path)):
        log.warning("--init-from-config: ignoring the weights in %s (training from a fresh initialisation)", path)
    depths = getattr(mcfg, "num_nextn_predict_layers", 0) or 0
    return init_model(mcfg, mesh, dtype, seed=seed, num_mtp_layers=depths if mtp else 0)


def _has_routing_bias(cfg) -> bool:
    return isinstance(cfg, DeepseekConfig) and cfg.num_moe_layers > 0 and cfg.topk_method == "noaux_tc"


def _raw_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _aux_alpha(cfg: TrainConfig, path: str) -> float:
    """--aux-loss-alpha, else the checkpoint's aux_loss_alpha (DeepSeek-V2 ships 0.001), else 0."""
    if cfg.aux_loss_alpha is not None:
        return cfg.aux_loss_alpha
    return float(_raw_config(path).get("aux_loss_alpha") or 0.0)


def _seq_aux(cfg: TrainConfig, path: str) -> bool:
    if cfg.seq_aux is not None:
        return cfg.seq_aux
    return bool(_raw_config(path).get("seq_aux", True))


def _norm(v):
    """JSON round trip (tuples -> lists) so stored and current identities compare equal."""
    return json.loads(json.dumps(v))


__all__ = ["Trainer", "Interrupted", "train", "build_mesh", "init_from_config"]
