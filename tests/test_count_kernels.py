"""benchmarks/count_kernels.py's reading of optimised HLO: what counts as a kernel, loops times their trip
count. (Compiling for a GPU target needs jax's CUDA plugin, which CI does not install; the reading is
checked here on a hand-written module and on one XLA compiles for the CPU.)"""

import jax
import jax.numpy as jnp

from benchmarks import count_kernels as ck

HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_add (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p0, %p0)
}

%body (param: (s32[], f32[4])) -> (s32[], f32[4]) {
  %param = (s32[], f32[4]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%param), index=0
  %gte.1 = f32[4]{0} get-tuple-element(%param), index=1
  %loop_add_fusion = f32[4]{0} fusion(%gte.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/while/body/mlp/add"}
  %gemm = (f32[4]{0}, s8[16]{0}) custom-call(%loop_add_fusion), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/while/body/mlp/dot_general"}
  %gte.2 = f32[4]{0} get-tuple-element(%gemm), index=0
  %copy.1 = f32[4]{0} copy(%gte.2)
  %bitcast.1 = f32[4]{0} bitcast(%copy.1)
  %constant.1 = s32[] constant(1)
  %counter = s32[] fusion(%gte.0), kind=kLoop, calls=%fused_add
  ROOT %tuple.1 = (s32[], f32[4]{0}) tuple(%counter, %bitcast.1)
}

%cond (param.1: (s32[], f32[4])) -> pred[] {
  %param.1 = (s32[], f32[4]{0}) parameter(0)
  ROOT %lt = pred[] fusion(%param.1), kind=kLoop, calls=%fused_add
}

%small (p.2: f32[4]) -> f32[4] {
  %p.2 = f32[4]{0} parameter(0)
  ROOT %f.2 = f32[4]{0} fusion(%p.2), kind=kLoop, calls=%fused_add
}

%big (p.3: f32[4]) -> f32[4] {
  %p.3 = f32[4]{0} parameter(0)
  %f.3 = f32[4]{0} fusion(%p.3), kind=kLoop, calls=%fused_add
  ROOT %f.4 = f32[4]{0} fusion(%f.3), kind=kInput, calls=%fused_add
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %x)
  %while.1 = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %out = f32[4]{0} get-tuple-element(%while.1), index=1
  %pred = pred[] constant(true)
  %branch = f32[4]{0} conditional(%pred, %out, %out), true_computation=%big, false_computation=%small
  ROOT %last = f32[4]{0} fusion(%branch), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/add"}
}
"""


def test_counts_launches_not_bookkeeping():
    comps, entry = ck.computations(HLO)
    assert entry == "main"
    tree = ck.kernel_tree(comps, entry)
    (loop,) = tree["loops"]
    assert loop["trip"] == 7
    # fusion, library gemm, copy, counter fusion; not parameters, tuples, GTEs, bitcasts, constants (and not the
    # condition: XLA skips it when the trip count is known)
    assert [k for k, _ in loop["body"]["kernels"]] == ["fusion:kLoop:fused_add", "library:__cublas$gemm", "copy",
                                                      "fusion:kLoop:fused_add"]
    assert ck.scope_of(loop["body"]["kernels"][1][1]) == "mlp"
    # 7 x 4 in the loop, the conditional's larger branch (2), the last fusion (1)
    assert ck.total(tree) == 7 * 4 + 2 + 1


def test_loop_without_known_trip_count_runs_its_condition():
    comps, entry = ck.computations(HLO.replace(', backend_config={"known_trip_count":{"n":"7"}}', ""))
    (loop,) = ck.kernel_tree(comps, entry)["loops"]
    assert loop["trip"] is None and len(loop["body"]["kernels"]) == 5


def test_reads_what_xla_compiles():
    def step(x, ws):
        def body(h, w):
            return jnp.tanh(h @ w) + h, None
        return jax.lax.scan(body, x, ws)[0].sum()

    hlo = jax.jit(step).lower(jnp.ones((2, 8)), jnp.ones((5, 8, 8))).compile().as_text()
    comps, entry = ck.computations(hlo)
    tree = ck.kernel_tree(comps, entry)
    trips = [loop["trip"] for loop in tree["loops"]]
    assert trips == [5], trips
    body = ck.total(tree["loops"][0]["body"])
    assert body >= 1 and ck.total(tree) == len(tree["kernels"]) + 5 * body


def test_target_configs_name_hopper():
    for target in ck.TARGETS:
        text = ck.target_config(target)
        assert "cuda_compute_capability { major: 9 minor: 0 }" in text and "core_count: 132" in text


def test_copies_counts_data_movement_with_trip_counts():
    """--train's copy listing: the loop body's `copy` runs 7 times and writes 16 bytes each; fusions and library
    calls that compute are not copies."""
    moves = ck.copies(HLO)
    assert [(n, kind, nbytes) for n, kind, _, nbytes, _ in moves] == [(7, "copy", 16)]
