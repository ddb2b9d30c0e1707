"""The static choices of a model: kernels, remat, compute dtype, scan, mesh and rules, compiler options.

One frozen, hashable `Options` is given when a model is built (`from_pretrained(..., options=)`,
`init_model(..., options=)`, `CausalLM(cfg, options=)`) and lives on the model as `model.options`. It is part
of the model's static graph definition, so a jitted function of `nnx.split(model)` compiles once per options:
`model.with_options(remat="full")` returns the same parameters under other options, and a call with it compiles
a new program, never a stale one. The layers read the options from the forward inputs the model builds
(`jaxmodels.inputs.Inputs.options`); nothing is switched by a module global, an attribute set afterwards, or
an ambient context.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "cudnn_packed", "splash")
GROUPED_MATMUL_IMPLS = ("auto", "auto-xla-drhs", "xla")
GATHER_FORMS = ("reduce", "einsum")

# Rematerialisation policies of the layer scan body (`remat`), by name: jaxmodels.layers.stack.REMAT_POLICIES
# says what each keeps.
REMAT_NAMES = ("none", "full", "save_matmuls", "save_all_dots", "lean")

# XLA:GPU compiler options for the generation programs (other backends ignore them). Inside the layer scan
# each layer's weights are a dynamic-slice of the stacked [layers, ...] parameters. Measured on an H100
# (stablelm-3b decode, benchmarks/RESULTS.md 2026-11-23 18:30 UTC):
# - Triton GEMM fusions cannot read a dynamic-slice operand, so XLA copied every MLP weight out of the stack
#   before its matmul (3 x 35 MB per layer per step); cuBLAS with dynamic-slice fusion reads it in place.
# - The dot-merger pass fuses q/k/v (and gate/up) into one matmul by concatenating their weights: a copy of
#   those weights every step, since they change with the layer.
# Without both, a decode step reads each weight once: b1 5.58 -> 3.16 ms, b32 9.00 -> 5.24 ms (prefill 1x2048
# 64.5k -> 79.1k tok/s); MLA/MoE decode unchanged. (The training step measured the same with and without them.)
GENERATE_COMPILER_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False,
                             "xla_disable_hlo_passes": "dot-merger"}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class OptionsError(ValueError):
    """An option value that does not exist (the message names the option and its choices)."""


def _freeze(mapping) -> tuple | None:
    """A mapping as a sorted tuple of (key, value) pairs (hashable), tuples of mesh axes for rules."""
    if mapping is None:
        return None
    if isinstance(mapping, tuple):
        mapping = dict(mapping)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(mapping).items()))


@dataclasses.dataclass(frozen=True)
class Options:
    """Static choices of a model's forward passes (hashable; part of the compiled program).

    attention: prefill/training attention kernel, one of ATTENTION_IMPLS ("auto": by platform and shapes;
        jaxmodels.layers.attention.choose_implementation). Decode over a cache always runs XLA.
    grouped_matmul: MoE grouped-matmul kernel, one of GROUPED_MATMUL_IMPLS (jaxmodels.layers.moe).
    gather_form: decode-sized MoE calls' expert gather, "reduce" (fused, in place) or "einsum" (a copy).
    gather_max_slots: token-slots up to which the MoE gathers the chosen experts instead of running the
        grouped matmul (None: fewer slots than experts).
    remat: one of REMAT_NAMES, the layer scan's rematerialisation (training; jaxmodels.layers.stack).
    compute_dtype: the activations' dtype ("bfloat16", "float32", ... or a jnp dtype; weights are cast where
        used); None: the parameters' dtype.
    scan: run each layer stack as one loop (True) or unrolled in the program (False; the MoE and loss chunk loops
        too, in at most 2 chunks: the programs whose cost XLA's cost analysis prices, jaxmodels.pods).
    mesh: the jax Mesh the model runs on (activations constrained and MoE expert-parallel over it), or None.
    rules: overrides of the logical-axis table (jaxmodels.sharding.RULES), frozen; used with `mesh`.
    compiler_options: XLA compiler options of the generation programs (None: GENERATE_COMPILER_OPTIONS).
    """

    attention: str = "auto"
    grouped_matmul: str = "auto"
    gather_form: str = "reduce"
    gather_max_slots: int | None = None
    remat: str = "none"
    compute_dtype: Any = None
    scan: bool = True
    mesh: Any = None
    rules: Any = None
    compiler_options: Any = None

    def __post_init__(self):
        for name, value, choices in (("attention", self.attention, ATTENTION_IMPLS),
                                     ("grouped_matmul", self.grouped_matmul, GROUPED_MATMUL_IMPLS),
                                     ("gather_form", self.gather_form, GATHER_FORMS),
                                     ("remat", self.remat, REMAT_NAMES)):
            if value not in choices:
                raise OptionsError(f"Options.{name}={value!r} is not one of {choices}")
        if self.compute_dtype is not None:
            name = jnp.dtype(self.compute_dtype).name
            if name not in _DTYPES:
                raise OptionsError(f"Options.compute_dtype={self.compute_dtype!r}: use one of {sorted(_DTYPES)}")
            object.__setattr__(self, "compute_dtype", name)
        object.__setattr__(self, "rules", _freeze(self.rules))
        object.__setattr__(self, "compiler_options", _freeze(self.compiler_options))

    @property
    def dtype(self):
        """The compute dtype as a jnp dtype, or None (the parameters' dtype)."""
        return None if self.compute_dtype is None else _DTYPES[self.compute_dtype]

    @property
    def rules_table(self) -> dict:
        """The full logical-axis table: jaxmodels.sharding.RULES with `rules` applied."""
        from jaxmodels import sharding
        return sharding.make_rules(self.rules)

    @property
    def generate_compiler_options(self) -> dict:
        return dict(GENERATE_COMPILER_OPTIONS if self.compiler_options is None else self.compiler_options)

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


def as_options(options: Options | Mapping | None = None, **changes) -> Options:
    """An Options from an Options, a dict of its fields or None (the defaults), with `changes` applied."""
    if options is None:
        options = Options()
    elif isinstance(options, Mapping):
        options = Options(**options)
    elif not isinstance(options, Options):
        raise OptionsError(f"options must be a jaxmodels.Options or a dict of its fields, got {type(options).__name__}")
    return options.replace(**changes) if changes else options


__all__ = ["Options", "OptionsError", "as_options", "ATTENTION_IMPLS", "GROUPED_MATMUL_IMPLS", "GATHER_FORMS",
           "REMAT_NAMES", "GENERATE_COMPILER_OPTIONS"]
