"""grouped_matmul (the MoE grouped matmul): forward and gradients against a dense per-row reference.

On CPU: the XLA path (jax.lax.ragged_dot) and the custom VJP that wraps the Hopper Mosaic-GPU kernels, the
latter run with XLA kernels made to behave like the Mosaic ones (rows beyond the groups left as garbage,
group edges masked by multiplying by zero). On a Hopper GPU (`pytest -m gpu`): the Mosaic kernels themselves
against jax.lax.ragged_dot at DeepSeek-V2-Lite and V3 expert shapes.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import moe

HIGHEST = jax.lax.Precision.HIGHEST

# Rows beyond sum(group_sizes) (48 rows, 31 or 25 owned) and empty groups, first / middle / last.
GROUP_SIZES = [[5, 0, 13, 9, 0, 4], [0, 7, 0, 12, 6, 0]]
M, K, N = 48, 16, 24


def dense_reference(lhs, rhs, group_sizes):
    """Each row times its own group's matrix (a one-hot over groups); rows no group owns give zero."""
    gid = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(lhs.shape[0]), side="right")  # [m]; G: no group
    onehot = jax.nn.one_hot(gid, rhs.shape[0], dtype=lhs.dtype)  # [m, G]
    return jnp.einsum("mk,mg,gkn->mn", lhs, onehot, rhs, precision=HIGHEST)  # [m, n]


def inputs(group_sizes, tail=7.0, dtype=jnp.float32):
    key = jax.random.key(0)
    lhs = jax.random.normal(key, (M, K), jnp.float32)
    owned = np.arange(M) < sum(group_sizes)
    lhs = jnp.where(owned[:, None], lhs, tail)  # garbage in rows no group owns: must not reach any gradient
    rhs = jax.random.normal(jax.random.fold_in(key, 1), (len(group_sizes), K, N), jnp.float32)
    cot = jax.random.normal(jax.random.fold_in(key, 2), (M, N), jnp.float32)  # nonzero in the tail too
    return lhs.astype(dtype), rhs.astype(dtype), jnp.asarray(group_sizes, jnp.int32), cot.astype(dtype)


def value_and_grads(f, lhs, rhs, gs, cot):
    out, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
    return (out, *vjp(cot))


# XLA kernels that behave like the Mosaic ones where it matters for the VJP's math.
def _garbage_tail(kernel):
    """The kernel, with the rows beyond sum(group_sizes) left as NaN (the Mosaic kernels never write them)."""
    def f(a, b, gs):
        out = kernel(a, b, gs)
        return jnp.where((jnp.arange(out.shape[0]) < gs.sum())[:, None], out, jnp.nan)
    return f


def _masking_drhs(lhs, dout, gs):
    """d_rhs masking rows by multiplying by zero, as the transposed Mosaic kernel does: NaN/Inf in a row no
    group owns would leak into the result."""
    gid = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(lhs.shape[0]), side="right")
    onehot = jax.nn.one_hot(gid, gs.shape[0], dtype=lhs.dtype)  # [m, G]
    return jnp.einsum("mg,mk,mn->gkn", onehot, lhs, dout, precision=HIGHEST)


MOSAIC_LIKE = (_garbage_tail(moe._xla_fwd), _garbage_tail(moe._xla_dlhs), _masking_drhs)
XLA_KERNELS = (moe._xla_fwd, moe._xla_dlhs, moe._xla_drhs)
# The same for rhs stored [G, n, k] (transpose_rhs): the forward is the plain d_lhs product and vice versa.
MOSAIC_LIKE_T = (_garbage_tail(moe._xla_dlhs), _garbage_tail(moe._xla_fwd),
                 lambda lhs, dout, gs: _masking_drhs(dout, lhs, gs))
XLA_KERNELS_T = moe._XLA_KERNELS[True]


def _t(rhs):
    return jnp.swapaxes(rhs, -1, -2)  # [G, k, n] -> [G, n, k]


@pytest.mark.parametrize("group_sizes", GROUP_SIZES)
@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_xla_path_matches_dense(group_sizes, impl):
    lhs, rhs, gs, cot = inputs(group_sizes)
    got = value_and_grads(lambda a, b, g: moe.grouped_matmul(a, b, g, impl=impl), lhs, rhs, gs, cot)
    want = value_and_grads(dense_reference, lhs, rhs, gs, cot)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.any(got[1][sum(group_sizes):]), "rows beyond the groups must get zero gradient"


@pytest.mark.parametrize("group_sizes", GROUP_SIZES)
@pytest.mark.parametrize("kernels", [XLA_KERNELS, MOSAIC_LIKE], ids=["xla", "mosaic-like"])
@pytest.mark.parametrize("tail", [7.0, np.inf])
def test_custom_vjp_matches_dense(group_sizes, kernels, tail):
    lhs, rhs, gs, cot = inputs(group_sizes)
    gmm = moe._grouped_matmul_vjp(*kernels)
    # Rows no group owns hold garbage (Inf too) in lhs and in the cotangent: it must reach no gradient.
    bad_lhs, bad_cot = lhs.at[sum(group_sizes):].set(tail), cot.at[sum(group_sizes):].set(tail)
    got = jax.jit(lambda a, b, g, c: value_and_grads(gmm, a, b, g, c))(bad_lhs, rhs, gs, bad_cot)
    want = value_and_grads(dense_reference, lhs, rhs, gs, cot)  # finite tails, never used
    np.testing.assert_array_equal(jax.jit(gmm)(bad_lhs, rhs, gs), got[0])  # the primal (no VJP) path
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.any(got[0][sum(group_sizes):]) and not np.any(got[1][sum(group_sizes):])
    empty = [g for g, s in enumerate(group_sizes) if s == 0]
    assert not np.any(got[2][np.asarray(empty)]), "empty groups must get zero weight gradient"


@pytest.mark.parametrize("group_sizes", GROUP_SIZES)
@pytest.mark.parametrize("kernels", [None, XLA_KERNELS_T, MOSAIC_LIKE_T], ids=["grouped_matmul", "xla", "mosaic-like"])
def test_transposed_rhs_matches_dense(group_sizes, kernels):
    """rhs stored [G, n, k] (the fused gate/up experts' layout): values and both gradients equal the plain
    layout's dense reference, through grouped_matmul(transpose_rhs=True) and through the custom VJP built
    from the transposed layout's kernels (rows beyond the groups garbage in lhs and the cotangent)."""
    lhs, rhs, gs, cot = inputs(group_sizes)
    f = (lambda a, b, g: moe.grouped_matmul(a, b, g, transpose_rhs=True)) if kernels is None else \
        moe._grouped_matmul_vjp(*kernels)
    bad_lhs, bad_cot = lhs.at[sum(group_sizes):].set(np.inf), cot.at[sum(group_sizes):].set(np.inf)
    if kernels is None:  # jax.lax.ragged_dot_general: rows beyond the groups are its own business
        bad_lhs, bad_cot = lhs, cot
    out, d_lhs, d_rhs_t = jax.jit(lambda a, b, g, c: value_and_grads(f, a, b, g, c))(bad_lhs, _t(rhs), gs, bad_cot)
    want = value_and_grads(dense_reference, lhs, rhs, gs, cot)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), (out, d_lhs, _t(d_rhs_t)), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.any(out[sum(group_sizes):]) and not np.any(d_lhs[sum(group_sizes):])


def test_custom_vjp_keeps_dtypes():
    lhs, rhs, gs, cot = inputs(GROUP_SIZES[0], dtype=jnp.bfloat16)
    out, d_lhs, d_rhs = value_and_grads(moe._grouped_matmul_vjp(*MOSAIC_LIKE), lhs, rhs, gs, cot)
    assert out.dtype == d_lhs.dtype == d_rhs.dtype == jnp.bfloat16
    want = value_and_grads(dense_reference, *(x.astype(jnp.float32) for x in (lhs, rhs)), gs,
                           cot.astype(jnp.float32))
    for g, w in zip((out, d_lhs, d_rhs), want):
        np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=2e-2, atol=2e-2 * float(jnp.abs(w).max()))


def test_local_experts_gradient_through_custom_vjp(monkeypatch):
    """The MoE expert block (foreign slots sorted last, as under expert parallelism) differentiates the same
    through the custom VJP as through jax.lax.ragged_dot."""
    t, k, e, d, i = 24, 2, 8, 16, 12
    key = jax.random.key(3)
    x = jax.random.normal(key, (t, d))
    ids = jax.random.randint(jax.random.fold_in(key, 1), (t, k), 0, e)
    weights = jax.random.uniform(jax.random.fold_in(key, 2), (t, k))
    ws = [jax.random.normal(jax.random.fold_in(key, 3 + j), s) * 0.3
          for j, s in enumerate([(e // 2, 2, i, d), (e // 2, i, d)])]  # gate_up [E, 2, inter, hidden], down

    def loss(x, *ws):  # the upper half of the experts are local: half the slots are foreign
        return jnp.sum(jnp.sin(moe.local_experts(x, ids, weights, *ws, "silu", first=e // 2)))

    want = jax.grad(loss, argnums=(0, 1, 2))(x, *ws)
    monkeypatch.setattr(moe, "_mosaic_gpu_ok", lambda lhs, rhs, impl, transpose_rhs=False: (True, True, True))
    for name, kernel in zip(("_mosaic_fwd", "_mosaic_dlhs", "_mosaic_drhs"), MOSAIC_LIKE):
        monkeypatch.setattr(moe, name, kernel)
    for name, kernel in zip(("_mosaic_fwd_t", "_mosaic_dlhs_t", "_mosaic_drhs_t"), MOSAIC_LIKE_T):
        monkeypatch.setattr(moe, name, kernel)
    got = jax.grad(loss, argnums=(0, 1, 2))(x, *ws)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


class _Device:
    def __init__(self, platform="gpu", compute_capability="9.0"):
        self.platform, self.compute_capability = platform, compute_capability


def test_mosaic_choice():
    bf = jnp.bfloat16

    def ok(k, n, impl="auto", dtype=bf, device=_Device()):
        return moe._mosaic_gpu_ok(jax.ShapeDtypeStruct((256, k), dtype), jax.ShapeDtypeStruct((8, k, n), dtype),
                                  impl, device)

    transposed = moe._transposed_kernel() is not None
    assert ok(2048, 1408) == (True, True, transposed)  # V2-Lite gate/up
    assert ok(1408, 2048) == (True, True, transposed)  # V2-Lite down (k % 128 == 0: 1408 = 11 * 128)
    assert ok(7168, 2048) == ok(2048, 7168) == (True, True, transposed)  # V3
    assert ok(1472, 1408) == (True, True, transposed)  # k % 128 != 0: 64-wide tiles for d_lhs / d_rhs
    assert ok(2048, 1408, impl="auto-xla-drhs") == (True, True, False)
    no = (False, False, False)
    assert ok(2048, 1408, impl="xla") == no
    assert ok(2048, 1344) == no  # n % 128 != 0: the forward kernel stores 128-wide tiles
    assert ok(2016, 1408) == no  # k % 64 != 0
    assert ok(2048, 1408, dtype=jnp.float32) == no
    assert ok(2048, 1408, device=_Device(compute_capability="8.0")) == no
    assert ok(2048, 1408, device=_Device(platform="cpu", compute_capability=None)) == no
    # rhs [G, n, k] (fused gate/up, [E, 2 * inter, hidden]): the same constraints on (k, n).
    def ok_t(k, n, impl="auto"):
        return moe._mosaic_gpu_ok(jax.ShapeDtypeStruct((256, k), bf), jax.ShapeDtypeStruct((8, n, k), bf), impl,
                                  _Device(), transpose_rhs=True)
    assert ok_t(2048, 2 * 1408) == ok_t(7168, 2 * 2048) == (True, True, transposed)  # V2-Lite, V3 gate/up
    assert ok_t(2048, 1344) == no and ok_t(2016, 2816) == no
    assert moe._mosaic_gpu_ok(jnp.zeros((4, 64), bf), jnp.zeros((2, 64, 128), bf), "auto")[0] == (
        jax.devices()[0].platform == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0")
    with pytest.raises(ValueError, match="impl"):
        ok(2048, 1408, impl="mosaic")


def test_forward_tiles_band_divides_the_column_tiles():
    """The forward kernel walks column tiles in bands of 8 only where 8 divides them (V3 gate/up: 16 tiles,
    V3 down: 56, V2-Lite down: 16); V2-Lite gate/up (11 tiles of 128) keeps single columns."""
    band = lambda n: moe._forward_tiles(n)["grid_block_n"]  # noqa: E731
    assert band(2048) == band(7168) == 8
    assert band(1408) == band(384) == 1
    tiles = moe._forward_tiles(2048)
    assert tiles["block_n"] == 128 and tiles["block_k"] == moe._BLOCK_K


# ---- Hopper GPU: the Mosaic kernels themselves ----

def _hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def _numpy_ragged_dot_vjp(lhs, rhs, cot, sizes, groups):
    """(out, d_lhs, d_rhs[groups]) of ragged_dot(lhs, rhs, sizes) with cotangent cot; rows past the groups
    are zero."""
    out, d_lhs, d_rhs = np.zeros(cot.shape), np.zeros(lhs.shape), np.zeros((len(groups),) + rhs.shape[1:])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(len(sizes)):
        rows = slice(starts[g], starts[g + 1])
        out[rows] = lhs[rows] @ rhs[g]
        d_lhs[rows] = cot[rows] @ rhs[g].T
    for i, g in enumerate(groups):
        rows = slice(starts[g], starts[g + 1])
        d_rhs[i] = lhs[rows].T @ cot[rows]
    return out, d_lhs, d_rhs


def _sizes(m, g, seed):
    """Uneven random group sizes summing to about 0.9 m, an eighth of the groups empty."""
    rng = np.random.default_rng(seed)
    sizes = np.floor(rng.dirichlet(np.full(g, 0.5)) * int(0.9 * m)).astype(np.int32)
    sizes[rng.choice(g, max(1, g // 8), replace=False)] = 0
    assert 0 < sizes.sum() < m
    return sizes


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (compute capability 9.0)")
@pytest.mark.parametrize("impl", ["auto", "auto-xla-drhs"])
@pytest.mark.parametrize("m,g,k,n", [
    (4096, 64, 2048, 1408),  # DeepSeek-V2-Lite gate / up
    (4096, 64, 1408, 2048),  # V2-Lite down
    (1024, 256, 7168, 2048),  # DeepSeek-V3 gate / up
    (1024, 256, 2048, 7168),  # V3 down
    (1000, 16, 1472, 384),  # 64-wide tiles (k % 128 != 0), rows not a multiple of any tile
])
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["kn", "nk"])  # nk: fused gate/up's [E, 2i, d]
def test_mosaic_matches_ragged_dot(m, g, k, n, impl, transpose_rhs):
    sizes = _sizes(m, g, seed=m + g + k)
    owned = int(sizes.sum())
    key = jax.random.key(0)
    lhs = jax.random.normal(key, (m, k), jnp.float32).at[owned:].set(50.0).astype(jnp.bfloat16)
    rhs = (jax.random.normal(jax.random.fold_in(key, 1), (g, k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    cot = jax.random.normal(jax.random.fold_in(key, 2), (m, n), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes)
    stored = _t(rhs) if transpose_rhs else rhs
    mosaic_drhs = impl == "auto" and (not transpose_rhs or k % 128 == 0)  # [n, k] output: 128-wide k tiles
    assert moe._mosaic_gpu_ok(lhs, stored, impl, transpose_rhs=transpose_rhs) == (True, True, mosaic_drhs)

    f = jax.jit(lambda a, b, gs, c: value_and_grads(
        lambda a, b, gs: moe.grouped_matmul(a, b, gs, impl=impl, transpose_rhs=transpose_rhs), a, b, gs, c))
    calls = re.findall(r"custom_call\s*@(\w+)", f.lower(lhs, stored, gs, cot).as_text())
    assert sum("mosaic" in c for c in calls) == (3 if mosaic_drhs else 2), calls
    out, d_lhs, d_rhs = f(lhs, stored, gs, cot)
    d_rhs = _t(d_rhs) if transpose_rhs else d_rhs  # [G, k, n] as the reference
    # d_rhs has every expert's [k, n] (7.5 GB at V3's shapes): check it on the device for the empty groups
    # and compare a sample of groups (non-empty ones at both ends and the middle, and one empty) on the host.
    empty = np.flatnonzero(sizes == 0)
    assert not bool(jnp.any(d_rhs[jnp.asarray(empty)])), "empty groups must get zero weight gradient"
    full = np.flatnonzero(sizes > 0)
    sample = np.unique(np.concatenate([full[:2], full[len(full) // 2:len(full) // 2 + 1], full[-2:], empty[:1]]))
    got = [np.asarray(x.astype(jnp.float32)) for x in (out, d_lhs, d_rhs[jnp.asarray(sample)])]

    # Reference: jax.lax.ragged_dot's meaning and VJP, group by group in float64 numpy on the same bf16
    # values (XLA's own GPU ragged_dot expands densely over the groups: minutes at 256 groups).
    want = _numpy_ragged_dot_vjp(*(np.asarray(x.astype(jnp.float32), np.float64) for x in (lhs, rhs, cot)), sizes,
                                 sample)
    for name, gv, wv in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert np.all(np.isfinite(gv)), name
        scale = np.abs(wv).max()
        # bf16 output rounding is 2**-9 relative; the kernels accumulate in float32.
        assert np.abs(gv - wv).max() <= 1e-2 * scale, (name, np.abs(gv - wv).max() / scale)
        assert np.linalg.norm(gv - wv) <= 5e-3 * np.linalg.norm(wv), name
    assert not np.any(got[0][owned:]) and not np.any(got[1][owned:]), "rows beyond the groups must be zero"


def test_permute_rows_value_and_gradient_equal_take():
    """moe.permute_rows is x[perm] with a gather (not a scatter-add) for its gradient: same values and
    gradient as jnp.take for a permutation, also under the MoE's repeat-then-permute."""
    rng = np.random.default_rng(0)
    t, k, d = 12, 3, 5
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    perm = jnp.asarray(rng.permutation(t * k), jnp.int32)
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(t * k, dtype=jnp.int32))
    cot = jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32)

    def ours(x):
        return jnp.sum(moe.permute_rows(jnp.repeat(x, k, axis=0), perm, inverse) * cot)

    def reference(x):  # the form the MoE used before: a gather by token index
        return jnp.sum(jnp.take(x, perm // k, axis=0) * cot)

    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-5, atol=1e-6)
    y = moe.permute_rows(moe.permute_rows(cot, perm, inverse), inverse, perm)
    np.testing.assert_array_equal(y, cot)  # unsorting undoes sorting
    assert "scatter" not in jax.jit(jax.grad(ours)).lower(x).as_text()


@pytest.mark.parametrize("form", ["reduce", "einsum"])
def test_gathered_experts_equal_grouped(form):
    """Decode-sized calls read only the chosen experts' fused gate/up [E, 2, inter, hidden] and down weights
    (both gather forms); they equal the sorted grouped-matmul path, foreign experts (expert parallelism)
    included."""
    t, k, e, d, i = 3, 2, 8, 16, 12
    key = jax.random.key(5)
    x = jax.random.normal(key, (t, d))
    ids = jax.random.randint(jax.random.fold_in(key, 1), (t, k), 0, e)
    weights = jax.random.uniform(jax.random.fold_in(key, 2), (t, k))
    gate_up = jax.random.normal(jax.random.fold_in(key, 3), (e // 2, 2, i, d)) * 0.3
    down = jax.random.normal(jax.random.fold_in(key, 4), (e // 2, i, d)) * 0.3
    from jaxmodels.options import Options
    gathered = moe.local_experts(x, ids, weights, gate_up, down, "silu", first=e // 2,
                                 options=Options(gather_form=form, gather_max_slots=1 << 20))
    grouped = moe.local_experts(x, ids, weights, gate_up, down, "silu", first=e // 2,
                                options=Options(gather_form=form, gather_max_slots=0))
    np.testing.assert_allclose(gathered, grouped, rtol=1e-5, atol=1e-5)
    # and both equal the per-slot formula with gate = gate_up[:, 0], up = gate_up[:, 1]
    want = np.zeros((t, d))
    for r in range(t):
        for j in range(k):
            ex = int(ids[r, j]) - e // 2
            if 0 <= ex < e // 2:
                g, u = gate_up[ex, 0] @ x[r], gate_up[ex, 1] @ x[r]
                want[r] += float(weights[r, j]) * np.asarray((jax.nn.silu(g) * u) @ down[ex])
    np.testing.assert_allclose(grouped, want, rtol=1e-4, atol=1e-5)


def test_chunked_experts_equal_one_pass(monkeypatch):
    """Above MAX_SLOTS_PER_CHUNK token-slots the experts run over chunks of tokens (checkpointed lax.map):
    the same output and the same gradients (tokens, routing weights, the fused gate/up and the down weights) as
    one pass."""
    t, k, e, d, i = 48, 2, 4, 16, 8
    ks = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(ks[0], (t, d))
    ids = jax.random.randint(ks[1], (t, k), 0, e)
    w = jax.nn.softmax(jax.random.normal(ks[2], (t, k)), -1)
    gate_up = jax.random.normal(ks[3], (e, 2, i, d)) * 0.5  # fused gate/up, [out, in] each
    down = jax.random.normal(ks[5], (e, i, d))

    def f(x, w, gate_up, down):
        return jnp.sum(jnp.sin(moe.chunked_experts(x, ids, w, gate_up, down, "silu")))

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
    monkeypatch.setattr(moe, "MAX_SLOTS_PER_CHUNK", 10**9)
    assert moe._num_chunks(t, k) == 1
    v1, g1 = grad(x, w, gate_up, down)
    monkeypatch.setattr(moe, "MAX_SLOTS_PER_CHUNK", 30)  # 96 slots -> 4 chunks of 12 tokens (48 % 4 == 0)
    assert moe._num_chunks(t, k) == 4
    v4, g4 = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, w, gate_up, down)
    np.testing.assert_allclose(v4, v1, rtol=1e-5)
    for a, b in zip(g4, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert moe._num_chunks(7, 10) == 7  # 70 slots: 3 chunks needed, 3 does not divide 7 tokens -> 7
