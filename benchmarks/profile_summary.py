"""Where a jitted program's device time goes: a jax profiler trace summarised as a table.

`trace(fn, steps, out_dir)` runs fn() `steps` times under `jax.profiler.trace(create_perfetto_trace=True)`;
`summarize(out_dir, steps)` reads the Chrome-format trace it wrote and sums the device's kernel time per
step: by category (matmul, attention, collective, copy, other fusions) and the top kernels by name (with the
HLO op that launched them where the trace names it). Only the device's own lines are counted (processes named
"/device:GPU:N" etc.; the host's Python lines are not), so the total is busy time, and step time minus it
is idle (launch gaps, host syncs).

  python benchmarks/profile_summary.py TRACE_DIR [--steps N] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

CATEGORIES = (  # (category, regex on the kernel name or its HLO op), first match wins
    ("attention", r"cudnn|fmha|flash|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|matmul|dot|ragged|mosaic"),
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
)


def trace(fn, steps: int, out_dir: str) -> None:
    import jax

    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn())


def profile(fn, steps: int, title: str, out_file: str | None = None) -> str:
    """Traces `steps` calls of fn into a temporary folder; prints the summary under `title` (and writes it
    to out_file) and returns it."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="trace_")
    trace(fn, steps, tmp)
    text = f"## {title}\n\n" + summarize(tmp, steps)
    print(text, flush=True)
    if out_file:
        os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
        with open(out_file, "w") as f:
            f.write(text + "\n")
    return text


def _events(out_dir: str):
    files = sorted(glob.glob(os.path.join(out_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {out_dir}")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(out_dir: str, steps: int = 1, top: int = 30) -> str:
    events = _events(out_dir)
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"].get("name", "") for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"].get("name", "") for e in meta if e.get("name") == "thread_name"}
    device = {p for p, n in procs.items() if re.search(r"/device:(GPU|TPU)", n)}
    if not device:  # a CPU run: XLA's own threads on the host stand in for the device
        device = set(procs)
    # Device lines: kernel streams (on CPU: XLA's executor threads). Derived lines ("XLA Ops", "XLA Modules",
    # "Steps", ...) repeat the same time; keep only those lines when there are any.
    lines = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device:
            lines[(e["pid"], e.get("tid"))].append(e)
    executors = re.compile(r"stream|XLAEigen|XLAPjRtCpuClient", re.I)
    streams = {k: v for k, v in lines.items() if executors.search(threads.get(k, ""))}
    chosen = streams or lines
    by_name = collections.Counter()
    count = collections.Counter()
    op_of = {}
    for evs in chosen.values():
        for e in evs:
            args = e.get("args") or {}
            op = args.get("hlo_op") or args.get("long_name") or ""
            name = e.get("name", "?")
            by_name[name] += e.get("dur", 0.0)
            count[name] += 1
            op_of.setdefault(name, op)
    total = sum(by_name.values())
    cats = collections.Counter()
    for name, us in by_name.items():
        key = f"{name} {op_of.get(name, '')}"
        cat = next((c for c, rx in CATEGORIES if re.search(rx, key, re.I)), "other fusions")
        cats[cat] += us
    out = [f"device busy time per step: {total / steps / 1e3:.2f} ms over {len(chosen)} device line(s) "
           f"({', '.join(sorted({threads.get(k, '?') for k in chosen}))[:200]})", "",
           "| category | ms/step | share |", "| --- | ---: | ---: |"]
    for cat, us in cats.most_common():
        out.append(f"| {cat} | {us / steps / 1e3:.2f} | {100 * us / max(total, 1e-9):.1f}% |")
    family = collections.Counter()  # kernel names without their trailing number: one row per kind of fusion
    for name, us in by_name.items():
        family[re.sub(r"([._]\d+)+$", "", name)] += us
    out += ["", "| kernel family | ms/step | share |", "| --- | ---: | ---: |"]
    for name, us in family.most_common(top // 2):
        out.append(f"| {name[:70]} | {us / steps / 1e3:.3f} | {100 * us / max(total, 1e-9):.1f}% |")
    out += ["", "| kernel | HLO op | calls/step | ms/step | share |", "| --- | --- | ---: | ---: | ---: |"]
    for name, us in by_name.most_common(top):
        out.append(f"| {name[:70]} | {op_of.get(name, '')[:50]} | {count[name] / steps:.0f} | {us / steps / 1e3:.3f} | "
                   f"{100 * us / max(total, 1e-9):.1f}% |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir")
    ap.add_argument("--steps", type=int, default=1, help="how many steps the trace holds (per-step figures)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print(summarize(args.trace_dir, args.steps, args.top))


if __name__ == "__main__":
    main()
