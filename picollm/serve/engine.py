"""The server's decode engine: one thread that steps every active request in turn.

A request is a Job: one `decode_steps` iterator per prompt (picollm/sampling.py, the loop `generate` runs),
whose rows are the prompt's n choices, as `pico-llm generate --num_samples n` batches them. So a seed gives
the same tokens here as through `generate`. The engine admits up to max_active jobs, the others wait in
arrival order; each round it advances every active job by one token. Concurrent streams are therefore
interleaved token by token (time-sliced, not batched into one forward pass): each stream gets its first
token after at most one round, and N streams share one stream's tokens/s (bench/serve_load.py measures
both). A job whose client went away is dropped at its next turn, which frees its slot.
"""

from __future__ import annotations

import codecs
import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import SampleConfig
from ..sampling import decode_steps


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
        self.steps: list = []  # one decode_steps iterator per prompt; None once it is done
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def start(self) -> None:
        model = self.served.model
        device = next(model.parameters()).device
        eot = self.served.tokenizer.eot_id
        for ids in self.prompts:
            idx = torch.tensor([ids] * self.n, dtype=torch.long, device=device)
            self.steps.append(decode_steps(model, idx, self.cfg, eot_id=eot, decoder=self.served.decoder))

    def advance(self) -> bool:
        """One token of every unfinished prompt; False once every choice has finished."""
        events: list[TokenEvent] = []
        eot = self.served.tokenizer.eot_id
        for p, it in enumerate(self.steps):
            if it is None:
                continue
            rows = self.choices[p * self.n: (p + 1) * self.n]
            try:
                nxt, logits = next(it)
            except StopIteration:
                nxt = None
            if nxt is None:
                events += [TokenEvent(p * self.n + j, c.end(), None, c.finish) for j, c in enumerate(rows) if not c.finish]
                self.steps[p] = None
                continue
            ids = nxt.tolist()
            lp = self._logprobs(logits, ids) if self.logprobs is not None else None
            for j, c in enumerate(rows):
                if c.finish:
                    continue
                text = c.add(ids[j], eot)
                shown = lp is not None and ids[j] != eot  # end-of-text ends the choice; it is not part of its text
                events.append(TokenEvent(p * self.n + j, text, lp[j] if shown else None, c.finish))
            if all(c.finish for c in rows):
                it.close()
                self.steps[p] = None
        if events:
            self.emit("tokens", events)
        return any(it is not None for it in self.steps)

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


class Engine:
    """The decode thread. submit() from any thread; stats() for /health."""

    def __init__(self, max_active: int = 8, max_queued: int = 256):
        self.max_active, self.max_queued = max_active, max_queued
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._run, name="pico-llm-engine", daemon=True)
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

    def _run(self) -> None:
        while True:
            self._admit()
            if self._closed:
                return
            for job in list(self._active):
                self._turn(job)

    def _turn(self, job: Job) -> None:
        done, outcome = False, None
        try:
            if job.cancelled.is_set():
                done, outcome = True, "cancelled"
            else:
                if not job.steps:  # only this thread runs the models
                    job.start()
                done = not job.advance()
                if done:
                    outcome = "served"
                    job.emit("done", job.usage())
        except Exception as e:  # the model failed on this request: say so to its client, keep serving
            done, outcome = True, "failed"
            job.emit("error", f"{type(e).__name__}: {e}")
        if done:
            job.close()
            with self._cv:
                self._active.remove(job)
                self.counts[outcome] += 1
                self.counts["tokens"] += sum(c.tokens for c in job.choices)
