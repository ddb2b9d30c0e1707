"""Continuous batching over the static cache: many requests, a fixed number of slots, a few compiled programs.

A slot is one row of the static cache (MLA latent or K/V) with its own position. A host loop

* admits waiting requests into free slots: their prompts are packed one after another into one prefill row
  (segment ids keep them apart, positions restart per prompt), sized to the smallest of a few token
  buckets that holds them, and each prompt's cache entries are scattered into its slot; a prompt longer
  than the largest bucket is prefilled in chunks, each chunk attending to the slot's cache so far;
* runs one jitted decode step for all slots (per-slot position, temperature, top-p, top-k, seed), reading
  the first `read_len` cache entries of every slot, `read_len` one of a few phases that hold the longest;
* retires a slot when its request ends (EOS, a stop condition, its token limit) and refills it at once.

The shapes never depend on the workload: the programs compile once each (prefill: one per token bucket,
one chunk program; decode: one per read phase, greedy or sampling), whatever the prompts and their number.
Greedy output of every request is what `jaxmodels.generate` gives on that prompt alone.

The host never waits for a step it has just launched: step n + 1 is dispatched before step n's tokens (and the
first tokens of the prompts admitted since) are read, so Python's bookkeeping overlaps the device's work (a slot
admitted or retired in between simply ignores the one step that ran across the change).

Model calls go through two functions only, `_prefill_into_slots` and `_decode_slots`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodels.cache import cache_shapes, init_cache
from jaxmodels.generate.sampling import filter_logits
from jaxmodels.generate.steps import GenerationError, _stack_sizes, program
from jaxmodels.inputs import Inputs, decode_inputs
from jaxmodels.options import Options


@dataclasses.dataclass
class Request:
    """One generation request. tokens: the prompt's ids. temperature 0 = greedy; top_k 0 / top_p 1 = off.
    stop: a host callback given the tokens generated so far, True to end the request with "stop"."""

    id: object
    tokens: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: Callable[[list[int]], bool] | None = None


@dataclasses.dataclass
class Result:
    """A finished request. finish_reason: "eos" | "stop" | "length" | "error" (then `error` says why)."""

    id: object
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    first_token_s: float | None = None  # seconds from the engine's start to this request's first token


def sample_rows(logits, temperature, top_p, top_k, seed, step, *, sample: bool):
    """Per-row next tokens [r] from logits [r, vocab]: argmax where temperature == 0, else a draw from the
    row's filtered softmax with key fold_in(key(seed), step) (a request's draws depend only on its own seed
    and step, never on its slot or its neighbours). sample=False (static): argmax for every row."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sample:
        return greedy
    temp = jnp.where(temperature > 0, temperature, 1.0)
    filtered = filter_logits(logits, temp, top_k, top_p)  # [r, vocab]
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed.astype(jnp.uint32), step)
    drawn = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _buffer_names(cfg) -> list[str]:
    return list(cache_shapes(cfg, 1, 1, 1))


# ----------------------------------------------------------------------------------------------------
# The two model calls
# ----------------------------------------------------------------------------------------------------

def _rows(cache, dest_slot, n, fresh, cfg, sizes, dtype):
    """The caches a prefill row writes: fresh zeroed ones of n entries, or (a chunk) its slot's whole row."""
    if fresh:
        return init_cache(cfg, sizes, 1, n, dtype)
    names = _buffer_names(cfg)
    return {k: c.replace(**{b: jax.lax.dynamic_index_in_dim(getattr(c, b), dest_slot[0], 1) for b in names
                            if hasattr(c, b)}) for k, c in cache.items()}


def _put(cache, row, dest_slot, positions, fresh, cfg):
    """Scatters a prefill row's cache entries into the slots' rows: token by token into (dest_slot, position)
    from a fresh row (slots >= S dropped), or the chunk's whole slot row back."""
    names = _buffer_names(cfg)

    def put(big, small):  # big [layers, S, T, ...], small [layers, 1, n or T, ...]
        if fresh:
            return big.at[:, dest_slot, positions[0]].set(small[:, 0], mode="drop")
        return jax.lax.dynamic_update_index_in_dim(big, small, dest_slot[0], 1)

    return {k: c.replace(**{b: put(getattr(c, b), getattr(row[k], b)) for b in names if hasattr(c, b)})
            for k, c in cache.items()}


def _prefill_into_slots(model, cache, ids, segments, positions, dest_slot, last_index, *, fresh: bool,
                        mcache=None, follow=None, pick=None):
    """Runs one prefill row and writes its cache entries into slots.

    ids, segments, positions [1, n]: packed prompts (segment 0 = padding; positions = cache indices, restarting
    at 0 per prompt for a fresh row, continuing a slot's cache for a chunk). dest_slot [n]: the slot each
    token's entry goes to (>= slots: dropped). last_index [k]: row index of the tokens whose logits are
    wanted (n: none). fresh=False (a chunk, one prompt): the chunk attends to its slot's cache (dest_slot[0])
    before it. mcache (speculative): the MTP layer's caches, also filled: the MTP pass pairs each token with the
    next one, a prompt's last token in the row with follow [k] (the prompt's next token, or -1: its first new
    token, pick(logits)). Returns (logits [k, vocab] float32, cache), and with mcache also (first tokens [k],
    drafts [k], mcache)."""
    cfg = model.config
    n = ids.shape[1]
    dtype = model.model.embed_tokens.weight.dtype
    if fresh:
        inputs = Inputs(positions=positions, segment_ids=segments, cache_index=jnp.zeros((), jnp.int32),
                        mode="prefill", options=model.options)
        t = n
    else:
        # The chunk's n tokens go to slots start .. start + n - 1 and attend causally to the slot's whole row
        # (its earlier entries and their own); padding queries (segment 0) attend nothing.
        t = next(iter(cache.values())).length
        inputs = Inputs(positions=positions, segment_ids=segments, kv_segment_ids=jnp.ones((1, t), jnp.int32),
                        cache_index=positions[0, 0], mode="decode", options=model.options)
    row = _rows(cache, dest_slot, n, fresh, cfg, _stack_sizes(model), dtype)
    h, row = model.model(ids, inputs, row)
    cache = _put(cache, row, dest_slot, positions, fresh, cfg)
    logits = model.logits(h[:, last_index])[0].astype(jnp.float32)  # [k, vocab]
    if mcache is None:
        return logits, cache
    first = pick(logits)
    nxt = jnp.where(follow >= 0, follow, first)  # [k]
    shifted = jnp.concatenate([ids[:, 1:], ids[:, -1:]], axis=1).at[0, last_index].set(nxt, mode="drop")
    mrow = _rows(mcache, dest_slot, n, fresh, cfg, {"mtp_layers": model.model.mtp_layers.num_layers}, dtype)
    hm, mrow, _ = model.model.mtp(h, shifted, inputs, mrow)
    drafts = jnp.argmax(model.logits(hm[:, last_index])[0].astype(jnp.float32), axis=-1).astype(jnp.int32)
    return logits, cache, first, drafts, _put(mcache, mrow, dest_slot, positions, fresh, cfg)


def _decode_slots(model, cache, tokens, positions, read_len: int):
    """One token per slot: tokens, positions [S] (the position = the cache index it is written to); attends to
    the slot's entries up to its own among the first read_len (static). Returns (logits [S, vocab], cache)."""
    every = jnp.ones((tokens.shape[0], read_len), jnp.int32)  # every slot's entries count, up to its own
    inputs = decode_inputs(positions[:, None], every, positions, model.options, read_len)
    h, cache = model.model(tokens[:, None], inputs, cache)
    return model.logits(h)[:, 0].astype(jnp.float32), cache


# ----------------------------------------------------------------------------------------------------
# Programs (pure functions of the model state; cache and slot state donated)
# ----------------------------------------------------------------------------------------------------

def _decode_slots_speculative(model, cache, mcache, tokens, drafts, positions, read_len: int):
    """Greedy self-speculative step for every slot (DeepSeek-V3's MTP layer, as `jaxmodels.generate.speculative`
    does per row): [token, draft] at positions p, p + 1 in one forward pass; the draft is accepted when it is the
    argmax after the token, which then gives one more token; the MTP layer drafts again from the last accepted
    position. Returns (new tokens [S, 2], accepted [S] bool, next drafts [S], cache, mcache)."""
    two = jnp.stack([tokens, drafts], axis=1)  # [S, 2]
    pos2 = positions[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
    every = jnp.ones((tokens.shape[0], read_len), jnp.int32)
    inputs = decode_inputs(pos2, every, positions, model.options, read_len)
    h, cache = model.model(two, inputs, cache)
    new = jnp.argmax(model.logits(h).astype(jnp.float32), axis=-1).astype(jnp.int32)  # [S, 2]
    accept = new[:, 0] == drafts
    hm, mcache, _ = model.model.mtp(h, new, inputs, mcache)
    hd = jnp.where(accept[:, None], hm[:, 1], hm[:, 0])  # the MTP state at the last accepted position
    nxt = jnp.argmax(model.logits(hd[:, None])[:, 0].astype(jnp.float32), axis=-1).astype(jnp.int32)
    return new, accept, nxt, cache, mcache


def _set_slots(st, slots, first, lengths, params, drafts=None):
    """The slot state after prefill: slots [k] (>= S: none) get their first token, position and parameters."""
    upd = dict(tokens=first, pos=lengths, step=jnp.ones_like(lengths), **params,
               draft=jnp.zeros_like(first) if drafts is None else drafts)
    return {name: st[name].at[slots].set(upd[name].astype(st[name].dtype), mode="drop") for name in st}


def _prefill_impl(graphdef, state, cache, mcache, st, ids, segments, positions, dest_slot, last_index, slots,
                  lengths, params, follow, *, fresh: bool):
    model = nnx.merge(graphdef, state)

    def pick(logits):
        return sample_rows(logits, params["temperature"], params["top_p"], params["top_k"], params["seed"],
                           jnp.zeros_like(lengths), sample=True)
    if not mcache:
        logits, cache = _prefill_into_slots(model, cache, ids, segments, positions, dest_slot, last_index,
                                            fresh=fresh)
        first, drafts = pick(logits), None
    else:
        _, cache, first, drafts, mcache = _prefill_into_slots(model, cache, ids, segments, positions, dest_slot,
                                                              last_index, fresh=fresh, mcache=mcache, follow=follow,
                                                              pick=pick)
    return cache, mcache, _set_slots(st, slots, first, lengths, params, drafts), first


def _decode_impl(graphdef, state, cache, mcache, st, *, read_len: int, sample: bool):
    model = nnx.merge(graphdef, state)
    t = next(iter(cache.values())).length
    if mcache:
        new, accept, drafts, cache, mcache = _decode_slots_speculative(model, cache, mcache, st["tokens"], st["draft"],
                                                                       st["pos"], read_len)
        adv = 1 + accept.astype(jnp.int32)
        st = dict(st, tokens=jnp.where(accept, new[:, 1], new[:, 0]), draft=drafts,
                  pos=jnp.minimum(st["pos"] + adv, t - 2), step=st["step"] + adv)
        return cache, mcache, st, jnp.concatenate([new, accept.astype(jnp.int32)[:, None]], axis=1)  # [S, 3]
    logits, cache = _decode_slots(model, cache, st["tokens"], st["pos"], read_len)
    tokens = sample_rows(logits, st["temperature"], st["top_p"], st["top_k"], st["seed"], st["step"], sample=sample)
    st = dict(st, tokens=tokens, pos=jnp.minimum(st["pos"] + 1, t - 1), step=st["step"] + 1)
    return cache, mcache, st, tokens


def prefill_program(options: Options = Options()):
    """The engine's jitted prefill (cache and slot state donated), with the model's compiler options."""
    return program(_prefill_impl, options, static_argnums=(0,), static_argnames=("fresh",), donate_argnums=(2, 3, 4))


def decode_program(options: Options = Options()):
    """The engine's jitted decode step for every slot (cache and slot state donated)."""
    return program(_decode_impl, options, static_argnums=(0,), static_argnames=("read_len", "sample"),
                   donate_argnums=(2, 3, 4))


# ----------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Slot:
    request: Request
    limit: int  # new tokens this request may produce (its max_new_tokens, capped by the cache)
    valid_from: int  # the first decode step whose output belongs to this request
    first: tuple | None  # (device tokens of its prefill, its row there) until the first token is read
    first_s: float | None = None  # seconds from the start of the run to the first token on the host
    tokens: list = dataclasses.field(default_factory=list)


PARAMS = {"temperature": np.float32, "top_p": np.float32, "top_k": np.int32, "seed": np.uint32}


class Engine:
    """Continuous batching of `Request`s over `slots` cache rows of `cache_len` entries.

    model: a jaxmodels CausalLM (with a mesh attached, the cache's slots are split as the sharding table says:
    `batch` over data). buckets: the prefill row lengths (ascending; a prompt longer than the last one is
    prefilled in chunks of that length). read_phases: at most this many decode read lengths (halving from
    cache_len). eos: ids that end a request (default: the config's). speculative: greedy self-speculative
    decoding with the model's DeepSeek-V3 MTP layer (each step verifies a draft: 1 or 2 tokens per slot, the same
    tokens as without; requests must be greedy).
    """

    def __init__(self, model, *, slots: int = 64, cache_len: int | None = None,
                 buckets: Sequence[int] = (256, 512, 1024, 2048), read_phases: int = 4, eos=None,
                 speculative: bool = False):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "logits"):
            raise GenerationError(f"the batch engine needs a jaxmodels CausalLM, got {type(model).__name__}")
        limit = cfg.max_position_embeddings
        if cache_len is None:
            cache_len = limit
        if cache_len > limit:
            # `dynamic` RoPE defines positions past the limit, but grows its base with the longest sequence of the
            # forward pass, which in the engine would tie a request's numbers to the other slots' lengths.
            raise GenerationError(f"cache_len={cache_len} exceeds the model's max_position_embeddings={limit}; use "
                                  f"at most {limit} (past it, rope type {cfg.rope.rope_type!r} runs with "
                                  "jaxmodels.generate only)")
        if slots < 1:
            raise GenerationError(f"slots must be >= 1, got {slots}")
        if speculative:
            from jaxmodels.layers.mtp import num_mtp_layers
            if num_mtp_layers(model) == 0:
                raise GenerationError("speculative=True needs DeepSeek-V3's multi-token-prediction (MTP) layer, which "
                                      "this model does not have: load a checkpoint that holds it, or use "
                                      "speculative=False")
        self.speculative = bool(speculative)
        self.model, self.slots, self.cache_len = model, int(slots), int(cache_len)
        self.buckets = sorted({min(int(b), self.cache_len) for b in buckets})
        self.eos = set(cfg.eos_token_ids if eos is None else eos)
        lens = sorted({self.cache_len >> k for k in range(read_phases)})
        self.read_lens = [n for n in lens if n >= min(128, self.cache_len)] or [self.cache_len]
        self.graphdef, self.state = nnx.split(model)
        self.mesh = model.options.mesh
        self._cache = None
        self.stats = {"decode_steps": 0, "prefill_calls": 0, "prefill_tokens": 0, "prefill_padding": 0,
                      "most_prompts_in_a_row": 0}

    # ---- device state
    def _fresh_state(self):
        dtype = self.model.model.embed_tokens.weight.dtype
        s = self.slots
        cache = init_cache(self.model.config, _stack_sizes(self.model), s, self.cache_len, dtype)
        mcache = {}
        if self.speculative:
            mcache = init_cache(self.model.config, {"mtp_layers": self.model.model.mtp_layers.num_layers}, s,
                                self.cache_len, dtype)
        # a layer counter per stack: the programs donate the cache, and one buffer cannot be donated twice
        cache = {k: c.replace(layer=jnp.zeros((), jnp.int32)) for k, c in cache.items()}
        mcache = {k: c.replace(layer=jnp.zeros((), jnp.int32)) for k, c in mcache.items()}
        st = {"tokens": np.zeros(s, np.int32), "pos": np.zeros(s, np.int32), "step": np.zeros(s, np.int32),
              "draft": np.zeros(s, np.int32), **{k: np.zeros(s, t) for k, t in PARAMS.items()}}
        if self.mesh is not None:
            from jaxmodels import sharding
            rules = self.model.options.rules
            return (jax.device_put(cache, sharding.cache_shardings(cache, self.mesh, rules)),
                    jax.device_put(mcache, sharding.cache_shardings(mcache, self.mesh, rules)),
                    {k: sharding.shard_batch(v, self.mesh, rules) for k, v in st.items()})
        # committed to the device, as the programs' outputs are: the first call then compiles what later calls run
        return jax.device_put((cache, mcache, st), jax.devices()[0])

    def _prefill(self, cache, mcache, st, docs, *, fresh: bool, start: int = 0):
        """docs: [(slot, tokens, request)] packed into one row (fresh), or one chunk at `start` (not fresh)."""
        total = sum(len(t) for _, t, _ in docs)
        n = next(b for b in self.buckets if b >= total) if fresh else self.buckets[-1]
        ids = np.zeros((1, n), np.int32)
        seg = np.zeros((1, n), np.int32)
        pos = np.zeros((1, n), np.int32)
        dest = np.full((n,), self.slots, np.int32)
        k = self.slots
        last = np.full((k,), n, np.int32)  # n: no prompt
        follow = np.full((k,), -1, np.int32)
        slot_of = np.full((k,), self.slots, np.int32)
        lengths = np.zeros((k,), np.int32)
        params = {name: np.zeros((k,), t) for name, t in PARAMS.items()}
        off = 0
        for i, (slot, toks, req) in enumerate(docs):
            m = len(toks)
            ids[0, off:off + m] = toks
            seg[0, off:off + m] = i + 1
            pos[0, off:off + m] = np.arange(start, start + m)
            dest[off:off + m] = slot
            last[i], slot_of[i], lengths[i] = off + m - 1, slot, start + m
            if start + m < len(req.tokens):  # the row holds part of the prompt: the MTP pass pairs its next token
                follow[i] = req.tokens[start + m]
            for name in PARAMS:
                params[name][i] = getattr(req, name)
            off += m
        if not fresh:
            pos[0, off:] = np.arange(start + off, start + n)  # padding of a chunk: written, then overwritten
            dest[off:] = slot_of[0]
            seg[0, off:] = 1
        self.stats["prefill_calls"] += 1
        self.stats["most_prompts_in_a_row"] = max(self.stats["most_prompts_in_a_row"], len(docs))
        self.stats["prefill_tokens"] += total
        self.stats["prefill_padding"] += n - total
        return prefill_program(self.model.options)(self.graphdef, self.state, cache, mcache, st, ids, seg, pos, dest,
                                                   last, slot_of, lengths, params, follow, fresh=fresh)

    def run(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Runs every request; yields a `Result` as each finishes (in finish order). Requests are pulled from
        the iterable only as slots free up."""
        t0 = time.perf_counter()
        it = iter(requests)
        exhausted = False
        pending: deque[Request] = deque()
        cache, mcache, st = self._cache if self._cache is not None else self._fresh_state()
        self._cache = None  # donated below: never reused after an error
        free = list(range(self.slots))[::-1]
        live: dict[int, _Slot] = {}
        step = 0  # decode steps dispatched so far
        inflight = None  # (step index, device tokens) of the last dispatched decode step
        c = self.buckets[-1]
        while True:
            # Pull requests while there is room for them.
            while not exhausted and len(pending) < len(free):
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                err = self._check(req)
                if err is not None:
                    yield Result(req.id, [], "error", len(req.tokens), error=err)
                else:
                    pending.append(req)
            # Admit: pack waiting prompts into prefill rows (a prompt longer than a row: its head, then chunks).
            admitted = []
            while pending and free:
                batch, total = [], 0
                while pending and free:
                    m = min(len(pending[0].tokens), c)
                    if batch and total + m > c:
                        break
                    batch.append((free.pop(), pending.popleft()))
                    total += m
                    if len(batch[-1][1].tokens) > c:
                        break
                cache, mcache, st, first = self._prefill(cache, mcache, st,
                                                         [(s, list(r.tokens[:c]), r) for s, r in batch], fresh=True)
                for i, (slot, req) in enumerate(batch):
                    src, j = first, i
                    for start in range(c, len(req.tokens), c):
                        cache, mcache, st, src = self._prefill(cache, mcache, st,
                                                               [(slot, list(req.tokens[start:start + c]), req)],
                                                               fresh=False, start=start)
                        j = 0
                    admitted.append((slot, req, src, j))
            for slot, req, src, j in admitted:  # their first tokens are read after the next step is dispatched
                room = self.cache_len - len(req.tokens) - (1 if self.speculative else 0)  # a step writes 1 or 2
                live[slot] = _Slot(req, min(req.max_new_tokens, room), valid_from=step, first=(src, j))
            if not live:
                if exhausted and not pending:
                    break
                continue
            # One decode step for all slots; then the previous step's tokens, read while this one runs.
            # the highest position this step writes + 1 (host counts lag the device by a step and a first token)
            need = max(len(s.request.tokens) + len(s.tokens) for s in live.values()) + (5 if self.speculative else 2)
            read_len = next(n for n in self.read_lens if n >= min(need, self.cache_len))
            sample = any(s.request.temperature > 0 for s in live.values())
            cache, mcache, st, tokens = decode_program(self.model.options)(self.graphdef, self.state, cache, mcache, st,
                                                                           read_len=read_len, sample=sample)
            self.stats["decode_steps"] += 1
            prev, inflight = inflight, (step, tokens)
            step += 1
            yield from self._collect(prev, live, free, t0)
        self._cache = (cache, mcache, st)

    def _collect(self, prev, live, free, t0):
        """Host bookkeeping while the next step runs: first tokens of newly admitted slots, then the tokens of
        the previous step (prev: (step, device tokens) or None)."""
        host = {}
        for slot in list(live):
            s = live[slot]
            if s.first is None:
                continue
            src, j = s.first
            if id(src) not in host:
                host[id(src)] = np.asarray(src)
            s.first, s.first_s = None, time.perf_counter() - t0
            done = self._accept(s, int(host[id(src)][j]))
            if done is not None:
                yield self._result(live.pop(slot), done)
                free.append(slot)
        if prev is None:
            return
        pstep, toks = prev
        toks = np.asarray(toks)
        for slot in list(live):
            s = live[slot]
            if pstep < s.valid_from:
                continue
            if self.speculative:  # [first, second, accepted]: the second counts only if the draft was accepted
                done = self._accept(s, int(toks[slot, 0]))
                if done is None and toks[slot, 2]:
                    done = self._accept(s, int(toks[slot, 1]))
            else:
                done = self._accept(s, int(toks[slot]))
            if done is not None:
                yield self._result(live.pop(slot), done)
                free.append(slot)

    def _accept(self, s: _Slot, token: int):
        """Appends a token to a live slot; returns the finish reason if the request ends with it."""
        if token in self.eos:
            return "eos"
        s.tokens.append(token)
        if s.request.stop is not None and s.request.stop(s.tokens):
            return "stop"
        if len(s.tokens) >= s.limit:
            return "length"
        return None

    @staticmethod
    def _result(s: _Slot, reason: str) -> Result:
        return Result(s.request.id, s.tokens, reason, len(s.request.tokens), first_token_s=s.first_s)

    def _check(self, req: Request) -> str | None:
        n = len(req.tokens)
        if n == 0:
            return "the prompt is empty: every request needs at least one token"
        if n >= self.cache_len:
            return (f"the prompt has {n} tokens, the cache holds {self.cache_len} per request: shorten the prompt "
                    f"or raise the cache length")
        if not isinstance(req.max_new_tokens, (int, np.integer)) or req.max_new_tokens < 1:
            return f"max_new_tokens must be an integer >= 1, got {req.max_new_tokens!r}"
        if not (req.temperature >= 0 and np.isfinite(req.temperature)):
            return f"temperature must be a finite float >= 0 (0 = greedy), got {req.temperature!r}"
        if not 0.0 < req.top_p <= 1.0:
            return f"top_p must be in (0, 1] (1 disables it), got {req.top_p!r}"
        if not isinstance(req.top_k, (int, np.integer)) or req.top_k < 0:
            return f"top_k must be an integer >= 0 (0 disables it), got {req.top_k!r}"
        if self.speculative and req.temperature > 0:
            return "the speculative engine decodes greedily: give temperature 0, or run an engine without speculative"
        if n + (1 if self.speculative else 0) >= self.cache_len:
            return (f"the prompt has {n} tokens, the cache holds {self.cache_len} per request: shorten the prompt "
                    f"or raise the cache length")
        vocab = self.model.config.vocab_size
        if min(req.tokens) < 0 or max(req.tokens) >= vocab:
            return f"token ids must lie in [0, vocab_size={vocab})"
        return None
