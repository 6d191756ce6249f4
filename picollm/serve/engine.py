"""The server's decode engine: one thread that advances every active request each round.

A request is a Job: its prompts, each with n rows (its choices, as `pico-llm generate --num_samples n`
batches them). The engine admits up to max_active jobs, the others wait in arrival order.

Where the model decodes through the fused C step (a Transformer on the CPU), the rows of every active job
share one RowPool: a FusedRows of pool_rows KV-cache slots. A job's rows join when it is admitted (its
prompts fed in one call each), and each round one C call samples and feeds a few positions (see RowPool)
of every live row of every job together (continuous batching). So N concurrent streams cost one batched
step, not N. Each prompt draws its uniform numbers from its own generator, as `decode_steps` does, and a
row's logits do not depend on the rows beside it (fused_decode.c sums in the same order at any batch), so
a seed gives the same tokens here as through `generate`, alone or beside other requests.

Other models (LSTM, k-gram, a mixture of experts, a GPU), and a job with more rows than the pool holds,
run their own `decode_steps` iterators, interleaved token by token. A job whose client went away is
dropped at its next round, which frees its rows.
"""

from __future__ import annotations

import codecs
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import SampleConfig
from ..models.fused import FusedDecoder, FusedRows, release_threads
from ..sampling import decode_steps, decoder_for


@dataclass
class ServedModel:
    """A run loaded for serving."""

    id: str  # what requests name in "model"
    run_dir: str
    model: torch.nn.Module
    tokenizer: object
    configs: tuple  # (ModelConfig, DataConfig, TrainConfig)
    summary: dict
    created: int
    decoder: str = "auto"

    @property
    def max_context(self) -> Optional[int]:
        return getattr(self.model, "max_context", None)


class ChoiceText:
    """One choice's completion as its tokens arrive: UTF-8 characters joined across tokens, stop strings
    found across token boundaries, and the text that might begin a stop string held back until it cannot."""

    def __init__(self, tokenizer, stops: list[str], max_tokens: int):
        self.tokenizer, self.stops, self.max_tokens = tokenizer, stops, max_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""  # the completion so far, held-back text included
        self.sent = 0  # characters of text handed out
        self.tokens = 0  # tokens generated for this choice, the one that stopped it included
        self.finish: Optional[str] = None  # "stop" | "length"

    def add(self, token_id: int, eot_id: int) -> str:
        """The token's effect: the text that may be sent now ("" when it is held back or stopped)."""
        self.tokens += 1
        if token_id == eot_id:
            return self._finish("stop", len(self.text))
        self.text += self._utf8.decode(self.tokenizer.token_bytes(token_id))
        for s in self.stops:  # a stop string can only begin at or after `sent` (see _held)
            at = self.text.find(s, self.sent)
            if at >= 0:
                return self._finish("stop", at)
        if self.tokens >= self.max_tokens:
            return self._finish("length", None)
        keep = len(self.text) - self._held()
        out, self.sent = self.text[self.sent: keep], keep
        return out

    def _held(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _finish(self, reason: str, cut: Optional[int]) -> str:
        """Ends the choice; cut: where the text ends (a stop string's start), None: all of it, flushed."""
        if cut is None:
            self.text += self._utf8.decode(b"", final=True)
            cut = len(self.text)
        self.text, self.finish = self.text[:cut], reason
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def end(self, reason: str = "length") -> str:
        """The iterator ran out before the choice finished."""
        return "" if self.finish else self._finish(reason, None)


@dataclass
class TokenEvent:
    index: int  # the choice
    text: str
    token: Optional[dict]  # {"id", "bytes", "logprob", "top": [(id, bytes, logprob), ...]} when logprobs were asked
    finish: Optional[str]


class Job:
    """One request: its prompts (token ids), sampling settings, and where its events go.

    emit(kind, payload) is called from the engine thread: ("tokens", [TokenEvent]), ("done", usage) or
    ("error", message). The caller passes a thread-safe emit (the app's uses loop.call_soon_threadsafe)."""

    _ids = itertools.count()

    def __init__(self, served: ServedModel, prompts: list[list[int]], cfg: SampleConfig, n: int, stops: list[str],
                 logprobs: Optional[int], emit: Callable[[str, object], None]):
        self.id = next(Job._ids)
        self.served, self.prompts, self.cfg, self.n, self.logprobs, self.emit = served, prompts, cfg, n, logprobs, emit
        tok = served.tokenizer
        self.choices = [ChoiceText(tok, stops, cfg.max_new_tokens) for _ in range(len(prompts) * n)]
        self.steps: list = []  # time-sliced: one decode_steps iterator per prompt; None once it is done
        self.pool: Optional[RowPool] = None  # pooled: the RowPool its rows are in,
        self.slots: list[list[int]] = []  # the rows of each prompt there ([] once it is done),
        self.gens: list = []  # and each prompt's generator
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def start(self) -> None:
        """Time-sliced: one decode_steps iterator per prompt."""
        model = self.served.model
        device = next(model.parameters()).device
        eot = self.served.tokenizer.eot_id
        for ids in self.prompts:
            idx = torch.tensor([ids] * self.n, dtype=torch.long, device=device)
            self.steps.append(decode_steps(model, idx, self.cfg, eot_id=eot, decoder=self.served.decoder))

    def advance(self) -> bool:
        """Time-sliced: one token of every unfinished prompt; False once every choice has finished."""
        events: list[TokenEvent] = []
        for p, it in enumerate(self.steps):
            if it is None:
                continue
            try:
                nxt, logits = next(it)
            except StopIteration:
                nxt = None
            if nxt is None:
                events += self._end(p)
                self.steps[p] = None
                continue
            events += self._deliver(p, nxt.tolist(), logits)
            if self._finished(p):
                it.close()
                self.steps[p] = None
        if events:
            self.emit("tokens", events)
        return any(it is not None for it in self.steps)

    # --- in a RowPool: the engine steps the rows of every pooled job together

    def rows_needed(self) -> int:
        return len(self.prompts) * self.n

    def join(self, pool: "RowPool") -> None:
        """Takes free rows of the pool and feeds the prompts; each prompt draws from its own generator."""
        eot = self.served.tokenizer.eot_id
        self.pool, self.slots, self.gens = pool, [], []
        for ids in self.prompts:
            rows = pool.take(self.n)
            pool.rows.start(rows, torch.tensor([ids] * self.n, dtype=torch.long), self.cfg, eot)
            self.slots.append(rows)
            self.gens.append(None if self.cfg.seed is None else torch.Generator().manual_seed(self.cfg.seed))

    def draw(self, u: torch.Tensor) -> None:
        """This round's uniform numbers of the job's live rows into u (positions, slots), as sample_next
        draws them (a prompt's generator gives its rows' numbers position by position)."""
        if self.cfg.greedy or self.cfg.temperature == 0:
            return
        for rows, gen in zip(self.slots, self.gens):
            if rows:
                u[:, rows] = torch.rand(u.size(0), len(rows), generator=gen)

    def collect(self, tokens: list[list[int]], logits: Optional[torch.Tensor]) -> bool:
        """This round's tokens (a list by position of lists by slot) (and logits (positions, slots, V)) of the
        job's rows; False once every choice has finished (its rows are back in the pool then)."""
        events: list[TokenEvent] = []
        for p, rows in enumerate(self.slots):
            if not rows:
                continue
            for i, ids in enumerate(tokens):  # positions after the prompt's last choice ended are not its
                if self._finished(p):
                    break
                events += self._deliver(p, [ids[r] for r in rows], None if logits is None else logits[i, rows])
            if self._finished(p):
                self.pool.give_back(rows)
                self.slots[p] = []
            else:  # a choice that a stop string ended: its row stops too
                ended = [r for r, c in zip(rows, self._choices(p)) if c.finish]
                if ended:
                    self.pool.rows.free(ended)
        if events:
            self.emit("tokens", events)
        return any(self.slots)

    # --- shared

    def _choices(self, p: int) -> list[ChoiceText]:
        return self.choices[p * self.n: (p + 1) * self.n]

    def _finished(self, p: int) -> bool:
        return all(c.finish for c in self._choices(p))

    def _end(self, p: int) -> list[TokenEvent]:
        """The prompt's rows ran out of tokens: its unfinished choices end."""
        return [TokenEvent(p * self.n + j, c.end(), None, c.finish) for j, c in enumerate(self._choices(p))
                if not c.finish]

    def _deliver(self, p: int, ids: list[int], logits: Optional[torch.Tensor]) -> list[TokenEvent]:
        """The events of one token for each row of prompt p (its finished choices ignore theirs)."""
        eot = self.served.tokenizer.eot_id
        lp = self._logprobs(logits, ids) if self.logprobs is not None else None
        events = []
        for j, c in enumerate(self._choices(p)):
            if c.finish:
                continue
            text = c.add(ids[j], eot)
            shown = lp is not None and ids[j] != eot  # end-of-text ends the choice; it is not part of its text
            events.append(TokenEvent(p * self.n + j, text, lp[j] if shown else None, c.finish))
        return events

    def _logprobs(self, logits: torch.Tensor, ids: list[int]) -> list[dict]:
        """The chosen token's log-probability and the top alternatives, under the model's own distribution
        (the logits before temperature, top-k or top-p, as OpenAI and vLLM report them)."""
        tok = self.served.tokenizer
        lp = torch.log_softmax(logits.float(), dim=-1)
        k = min(self.logprobs, lp.size(-1))
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        out = []
        for j, t in enumerate(ids):
            out.append({"id": t, "bytes": tok.token_bytes(t), "logprob": float(lp[j, t]),
                        "top": [(i, tok.token_bytes(i), v) for i, v in zip(top_i[j].tolist(), top_v[j].tolist())]})
        return out

    def close(self) -> None:
        for it in self.steps:
            if it is not None:
                it.close()
        self.steps = [None] * len(self.steps)
        for rows in self.slots:
            if rows:
                self.pool.give_back(rows)
        self.slots = [[] for _ in self.slots]


ROUND_SECONDS = 0.004  # a pooled round's length to aim for: a small model decodes several positions a round
ROUND_MAX_POSITIONS = 16


class RowPool:
    """The fused decoder's rows for one served model (see the module docstring): rows KV-cache slots, taken by
    jobs and given back, all stepped by one C call a round.

    A round decodes as many positions as fit in about ROUND_SECONDS (from the last round's time a position,
    at most ROUND_MAX_POSITIONS): at T4 size a position takes ~0.1 ms, and the Python around each round
    (draws, detokenizing, events) would cost as much again if every round were one position. Tokens then
    reach a client in bursts a few milliseconds apart, and a new request joins at the next round."""

    def __init__(self, dec: FusedDecoder, rows: int, max_new_tokens: int):
        self.rows = FusedRows(dec, rows, max_new_tokens, touch=True)
        self.free: list[int] = list(range(rows))
        self.jobs: list[Job] = []
        self.positions = 1  # the next round's

    @property
    def size(self) -> int:
        return self.rows.slots

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def give_back(self, rows: list[int]) -> None:
        self.rows.free(rows)
        self.free += rows

    def step(self) -> None:
        """A round: up to self.positions tokens for every live row of every job in the pool; finished jobs
        leave it."""
        S, n = self.size, self.positions
        u = torch.zeros(n, S)
        for job in self.jobs:
            job.draw(u)
        sampled = any(not (j.cfg.greedy or j.cfg.temperature == 0) for j in self.jobs)
        keep = any(j.logprobs is not None for j in self.jobs)
        t0 = time.perf_counter()
        tokens, logits = self.rows.run(n, u if sampled else None, keep)
        if len(tokens):
            per_position = (time.perf_counter() - t0) / len(tokens)
            self.positions = max(1, min(ROUND_MAX_POSITIONS, int(ROUND_SECONDS / max(per_position, 1e-6))))
        ids = tokens.tolist()
        for job in list(self.jobs):
            if not job.collect(ids, logits):
                self.jobs.remove(job)


class Engine:
    """The decode thread. submit() from any thread; stats() for /health. pool_rows: the KV-cache rows of
    each fused model's RowPool (default 2 max_active); max_new_tokens: the most tokens a request may ask."""

    def __init__(self, max_active: int = 8, max_queued: int = 256, pool_rows: Optional[int] = None,
                 max_new_tokens: int = 1024):
        self.max_active, self.max_queued = max_active, max_queued
        self.pool_rows, self.max_new_tokens = pool_rows or 2 * max_active, max_new_tokens
        self._pools: dict[int, Optional[RowPool]] = {}  # id(ServedModel) -> its pool, None: time-sliced
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "tokens": 0,
                       "batch_max": 0}  # the most requests one batched step has served together
        self._thread = threading.Thread(target=self._run, name="pico-llm-engine", daemon=True)
        release_threads()  # this thread's OpenMP team would slow the engine thread's (see release_threads)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queues the job; False when the queue is full."""
        with self._cv:
            if len(self._waiting) >= self.max_queued:
                return False
            self._waiting.append(job)
            self._cv.notify()
        return True

    def stats(self) -> dict:
        with self._cv:
            return {"active": len(self._active), "queued": len(self._waiting), "max_active": self.max_active,
                    **self.counts}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _admit(self) -> None:
        with self._cv:
            while not self._active and not self._waiting and not self._closed:
                self._cv.wait()
            while self._waiting and len(self._active) < self.max_active:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.counts["cancelled"] += 1
                    continue
                self._active.append(job)

    def _pool_for(self, job: Job) -> Optional[RowPool]:
        """The RowPool of the job's model, made at its first job; None where the model is not decoded by the
        fused step, or the job has more rows than the pool."""
        key = id(job.served)
        if key not in self._pools:
            dec = decoder_for(job.served.model, job.served.decoder)
            self._pools[key] = RowPool(dec, self.pool_rows, self.max_new_tokens) if isinstance(dec, FusedDecoder) else None
        pool = self._pools[key]
        return pool if pool is not None and job.rows_needed() <= pool.size else None

    def _run(self) -> None:
        while True:
            self._admit()
            if self._closed:
                return
            pools: dict[int, RowPool] = {}
            for job in list(self._active):
                try:
                    pool = self._pool_for(job)
                except Exception as e:  # the fused decoder could not be made: say so, keep serving
                    self._finish(job, "failed", f"{type(e).__name__}: {e}")
                    continue
                if pool is None:
                    self._turn(job)
                elif job.cancelled.is_set():
                    if job in pool.jobs:
                        pool.jobs.remove(job)
                    self._finish(job, "cancelled")
                elif job.pool is not None or len(pool.free) >= job.rows_needed():  # else it waits for rows
                    if job.pool is None:
                        job.join(pool)
                        pool.jobs.append(job)
                    pools[id(pool)] = pool
            for pool in pools.values():
                self._step(pool)

    def _step(self, pool: RowPool) -> None:
        """A round of the pool; its jobs that finished are done."""
        before = list(pool.jobs)
        self.counts["batch_max"] = max(self.counts["batch_max"], len(before))
        try:
            pool.step()
        except Exception as e:  # the step failed: every job in it says so to its client, the pool is reset
            for job in before:
                self._finish(job, "failed", f"{type(e).__name__}: {e}")
            pool.jobs.clear()
            return
        for job in before:
            if job not in pool.jobs:
                job.emit("done", job.usage())
                self._finish(job, "served")

    def _turn(self, job: Job) -> None:
        """A time-sliced job's token."""
        try:
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                return
            if not job.steps:  # only this thread runs the models
                job.start()
            if not job.advance():
                job.emit("done", job.usage())
                self._finish(job, "served")
        except Exception as e:  # the model failed on this request: say so to its client, keep serving
            self._finish(job, "failed", f"{type(e).__name__}: {e}")

    def _finish(self, job: Job, outcome: str, error: Optional[str] = None) -> None:
        if error is not None:
            job.emit("error", error)
        job.close()
        with self._cv:
            self._active.remove(job)
            self.counts[outcome] += 1
            self.counts["tokens"] += sum(c.tokens for c in job.choices)
