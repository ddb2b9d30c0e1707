"""What the benchmark scripts share: running one measurement in a fresh subprocess, and saving a table.

Each script runs its measurements as `python SCRIPT --worker KIND ...` subprocesses (GPU memory is
returned between them, and XLA flags are read at start-up); the worker prints one `RESULT {json}` line.
"""

from __future__ import annotations

import json
import os
import subprocess


def run_worker(cmd: list[str], label: str, *, timeout: float, out: str | None, env: dict | None = None,
               echo: bool = False) -> dict:
    """The worker's RESULT dict, or {"error": ...} (its output saved as out/fail_<label>.log). echo: print
    the worker's other output lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if echo:
            print(line, flush=True)
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    print(f"!! {label} failed (rc {proc.returncode}): {err[:300]}", flush=True)
    if out:
        with open(os.path.join(out, f"fail_{label.replace('/', '_').replace(' ', '_')}.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
    oom = "out of memory" in proc.stderr.lower() or "RESOURCE_EXHAUSTED" in proc.stderr
    return {"error": "out of memory" if oom else err[:120]}


def save_results(out: str | None, results: dict, table: str) -> None:
    """out/results.json and out/table.md (nothing without out)."""
    if not out:
        return
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")


def fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
