"""Gated MLP (SwiGLU with silu): down(act(gate(x)) * up(x))."""

from __future__ import annotations

from flax import nnx

from jaxmodels.layers.linear import Linear, gated


class MLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, act: str, bias: bool = False, dtype, rngs: nnx.Rngs,
                 std: float, mlp_axis: str = "mlp"):
        kw = dict(dtype=dtype, rngs=rngs, std=std, bias=bias)
        self.gate_proj = Linear(hidden, intermediate, axes=(mlp_axis, "embed"), **kw)
        self.up_proj = Linear(hidden, intermediate, axes=(mlp_axis, "embed"), **kw)
        self.down_proj = Linear(intermediate, hidden, axes=("embed", mlp_axis), **kw)
        self.act = act

    def __call__(self, x):
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), self.act))
