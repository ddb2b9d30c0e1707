"""Tokens to the host while a compiled generation loop runs: an ordered `io_callback` per step, routed to the
callback of the call that is running.

A compiled program cannot hold a Python callback of its own (jit caches the program, not the callback, and
one program serves every call in its shape buckets), so each call opens a `Channel` for its callback and
passes the channel's id to the program as a traced int32; the program's `emit(channel, ...)` reaches that
call's callback and no other, whichever calls (threads) run at the same time.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable

import jax
import numpy as np
from jax.experimental import io_callback

_lock = threading.Lock()
_ids = itertools.count(1)
_open: dict[int, Callable] = {}  # channel id -> the host callback of the call that opened it


class Channel:
    """`with Channel(fn) as ch:` run a program given `ch.id`; its `emit(ch.id, *arrays)` calls fn(*numpy arrays)
    in program order. Leaving the block waits for every pending callback (jax.effects_barrier)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        with _lock:
            self.id = next(_ids)

    def __enter__(self) -> "Channel":
        with _lock:
            _open[self.id] = self.fn
        return self

    def __exit__(self, *exc) -> None:
        try:
            jax.effects_barrier()
        finally:
            with _lock:
                _open.pop(self.id, None)


def _deliver(channel, *arrays) -> None:
    fn = _open.get(int(channel))
    if fn is not None:
        fn(*(np.asarray(a) for a in arrays))


def emit(channel, *arrays) -> None:
    """Inside a traced program: hand `arrays` to the host callback of channel id `channel` (int32 scalar)."""
    io_callback(_deliver, None, channel, *arrays, ordered=True)


class ColumnAssembler:
    """Speculative decoding produces 1 or 2 tokens per row per step, rows at different counts; this
    host-side buffer hands the user's streamer whole columns (step, tokens [batch]) in order, as plain
    decoding does: a column is complete once every row has produced it or has stopped (then: padding)."""

    def __init__(self, streamer, batch: int, pad: int):
        self.streamer, self.pad = streamer, pad
        self.cols: dict[int, np.ndarray] = {}
        self.count = np.zeros(batch, np.int64)  # tokens produced per row
        self.stopped = np.zeros(batch, bool)
        self.next = 0

    def __call__(self, n_before, toks, writes):
        active = writes[:, 0]
        for r in range(len(n_before)):
            for i in range(2):
                if writes[r, i]:
                    col = self.cols.setdefault(int(n_before[r]) + i, np.full(len(n_before), self.pad, np.int32))
                    col[r] = toks[r, i]
            self.count[r] = n_before[r] + writes[r].sum() if active[r] else self.count[r]
        # A row that wrote nothing this step (or hit EOS/max_new: it writes nothing afterwards) is finished
        # for the columns beyond its count; the loop only runs while some row is active.
        self.stopped |= ~active
        self._flush(lambda c: np.all((self.count > c) | self.stopped))

    def finish(self, length: int):
        self.stopped = np.ones_like(self.count, bool)
        self._flush(lambda c: c < length)

    def _flush(self, ready):
        while ready(self.next) and self.next in self.cols:
            self.streamer(self.next, self.cols.pop(self.next))
            self.next += 1
