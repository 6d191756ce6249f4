"""`pico-llm serve`: the OpenAI HTTP API over trained runs, and a playground page at `/`.

    GET  /                     the playground (static/index.html; every asset local)
    GET  /health               {"status": "ok", active, queued, served, cancelled, failed, tokens}
    GET  /v1/models            the served runs;  GET /v1/models/{id}: one of them
    POST /v1/completions       prompt: a string, a list of strings, token ids, or lists of token ids
    POST /v1/chat/completions  messages laid out by the chat template (protocol.py)
    GET  /pico/info            each run's config and final figures (what the playground shows)

Sampling is picollm.sampling's (the decode loop `generate` runs, through engine.py), so a seed gives the
tokens `pico-llm generate --seed` gives. `stream: true` answers with server-sent events ending in
`data: [DONE]`; the last chunk of each stream carries the usage counts. Errors have OpenAI's JSON body
{"error": {"message", "type", "param", "code"}} and status 400 (bad request), 404 (unknown model or path),
405, 429 (queue full) or 500 (the model failed; the server keeps serving).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, StreamingResponse

from ..checkpoint import WEIGHTS, checkpoint_file, load_run, read_summary, runs_under
from ..config import SampleConfig
from ..device import resolve_device
from ..errors import PicoError
from ..sampling import for_sampling
from .engine import Engine, Job, ServedModel
from .protocol import (
    MAX_LOGPROBS,
    MAX_N,
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_prompt,
    check_chat,
    check_completion,
    parse_body,
    stop_strings,
)

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}  # OpenAI's completions default is 16


def load_models(paths: list[str], device: str = "cpu", precision: str = "auto",
                decoder: str = "auto") -> list[ServedModel]:
    """Each run named (a folder of runs: every run inside), loaded for serving; ids are unique names."""
    dirs = []
    for path in paths:
        if not os.path.isdir(path):
            raise PicoError(f"{path} does not exist or is not a directory")
        found = runs_under(path)
        if not found:
            raise PicoError(f"{path}: no run there (a run directory holds config.json and model.safetensors)")
        dirs += found
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(set(names)) < len(names):  # e.g. the lstm of two multi-model runs: name them parent/run
        names = [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n) for d, n in zip(dirs, names)]
    if len(set(names)) < len(names):
        raise PicoError(f"two runs would be served under one name ({', '.join(names)}); serve them separately")
    served = []
    for d, name in zip(dirs, names):
        model, tok, configs = load_run(d, device)
        model, model_decoder = for_sampling(model, precision, device, decoder)  # as `pico-llm generate --precision`
        try:
            summary = read_summary(d)
        except PicoError:  # a run still training, or stopped: served all the same
            summary = {}
        created = int(os.path.getmtime(checkpoint_file(d, WEIGHTS)))
        served.append(ServedModel(id=name, run_dir=d, model=model, tokenizer=tok, configs=configs,
                                  summary=summary, created=created, decoder=model_decoder))
    return served


def install_error_handlers(app: FastAPI) -> None:
    """Every error answers with OpenAI's JSON body."""

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = {404: "no such path", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return JSONResponse(ApiError(e.status_code, message, kind=kind).body(), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e)).body(), 400)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body(), 500)


def model_card(m: ServedModel) -> dict:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": "pico-llm",
            "context_length": m.max_context}


def prompt_ids(m: ServedModel, prompt, truncate: Optional[int]) -> list[list[int]]:
    tok, ctx = m.tokenizer, m.max_context
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tok.encode(p) if p else [tok.eot_id]  # "": sample from end-of-text, as generate does
        else:
            if not p:
                raise ApiError(400, "a prompt of token ids is empty", param="prompt")
            bad = next((i for i in p if not 0 <= i < tok.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})",
                               param="prompt")
            ids = list(p)
        if truncate is not None:
            if ctx is not None and truncate > ctx:
                raise ApiError(400, f"truncate_prompt_tokens {truncate} is past the context of {ctx} tokens",
                               param="truncate_prompt_tokens")
            ids = ids[-truncate:]
        if ctx is not None and len(ids) > ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, longer than the model's context of {ctx} "
                                "(shorten it, or ask for truncate_prompt_tokens)",
                           param="prompt", code="context_length_exceeded")
        out.append(ids)
    return out


def sample_config(req, max_tokens: int) -> SampleConfig:
    top_k = None if req.top_k in (None, 0, -1) else req.top_k
    return SampleConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=top_k,
                        top_p=None if req.top_p >= 1.0 else req.top_p, greedy=req.temperature == 0,
                        stop_at_eot=True, seed=req.seed)


async def run_job(engine: Engine, request: Request, m: ServedModel, prompts, cfg: SampleConfig, n: int, stops, logprobs,
                  render, chat: bool, echo_texts: Optional[list[str]] = None):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(m, prompts, cfg, n, stops, logprobs,
              emit=lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))
    if not engine.submit(job):
        raise ApiError(429, "the server's queue is full; retry later", kind="rate_limit_error")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": rid, "created": created, "model": m.id}
    if render.stream:
        return StreamingResponse(stream(request, job, events, head, render, echo_texts),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, job, events, head, render, echo_texts)


async def next_event(request: Request, job: Job, events: asyncio.Queue):
    while True:  # wake now and then to notice a client that went away
        try:
            return await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return ("gone", None)


async def collect(request, job, events, head, render, echo_texts):
    texts = [echo_texts[i // job.n] if echo_texts else "" for i in range(len(job.choices))]
    tokens: list[list[dict]] = [[] for _ in job.choices]
    finish: list[Optional[str]] = [None] * len(job.choices)
    while True:
        kind, payload = await next_event(request, job, events)
        if kind == "tokens":
            for ev in payload:
                texts[ev.index] += ev.text
                if ev.token is not None:
                    tokens[ev.index].append(ev.token)
                finish[ev.index] = ev.finish or finish[ev.index]
        elif kind == "done":
            return JSONResponse(render.full(head, texts, tokens, finish, payload, job.choices))
        elif kind == "error":
            raise ApiError(500, payload, kind="server_error")
        else:
            return JSONResponse(ApiError(499, "client closed the request").body(), 499)


async def stream(request, job, events, head, render, echo_texts):
    try:
        for chunk in render.opening(head, len(job.choices), echo_texts, job.n):
            yield _sse(chunk)
        while True:
            kind, payload = await next_event(request, job, events)
            if kind == "tokens":  # a round's events (a few positions of every choice): one write
                out = "".join(_sse(render.chunk(head, ev)) for ev in payload if ev.text or ev.token is not None or ev.finish)
                if out:
                    yield out
            elif kind == "done":
                yield _sse({**render.chunk_head(head), "choices": [], "usage": payload})
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                yield _sse(ApiError(500, payload, kind="server_error").body())
                yield "data: [DONE]\n\n"
                return
            else:
                return
    finally:
        job.cancel()  # a no-op for a finished job; frees the slot of one whose client went away


def run_info(models: list[ServedModel], max_tokens_limit: int) -> dict:
    """/pico/info: each run's config and figures, and the request limits (what the playground shows)."""
    return {"models": [{"id": m.id, "run": m.run_dir, "model": m.configs[0].model,
                        "params": sum(p.numel() for p in m.model.parameters()),
                        "context_length": m.max_context, "config": m.configs[0].to_dict(),
                        "data": m.configs[1].to_dict(), "summary": m.summary, "prompt": m.configs[2].prompt,
                        "tokenizer": m.tokenizer.name} for m in models],
            "limits": {"max_tokens": max_tokens_limit, "n": MAX_N, "logprobs": MAX_LOGPROBS["completions"],
                       "top_logprobs": MAX_LOGPROBS["chat"]}}


def create_app(models: list[ServedModel], engine: Engine, chat_template: dict, max_tokens_limit: int = 1024):
    """The ASGI app (FastAPI): the routes of the module docstring."""
    by_id = {m.id: m for m in models}
    app = FastAPI(title="pico-llm", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    def pick(name: Optional[str]) -> ServedModel:
        if name is None:
            if len(by_id) == 1:
                return models[0]
            raise ApiError(400, f"model is required: this server serves {', '.join(by_id)}", param="model")
        if name not in by_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {', '.join(by_id)}",
                           param="model", code="model_not_found")
        return by_id[name]

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return model_card(pick(model_id))

    @app.get("/pico/info")
    async def info():
        return run_info(models, max_tokens_limit)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_body(await request.body(), CompletionRequest)
        check_completion(req, max_tokens_limit)
        m = pick(req.model)
        prompts = prompt_ids(m, req.prompt, req.truncate_prompt_tokens)
        cfg = sample_config(req, req.max_tokens or DEFAULT_MAX_TOKENS["completions"])
        render = CompletionRender(m.tokenizer, req.stream, req.stream_options)
        echo = [m.tokenizer.decode(p) for p in prompts] if req.echo else None
        return await run_job(engine, request, m, prompts, cfg, req.n, stop_strings(req.stop), req.logprobs, render,
                             chat=False, echo_texts=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_body(await request.body(), ChatRequest)
        max_tokens = check_chat(req, max_tokens_limit)
        m = pick(req.model)
        prompts = prompt_ids(m, chat_prompt(req.messages, chat_template), req.truncate_prompt_tokens)
        cfg = sample_config(req, max_tokens or min(DEFAULT_MAX_TOKENS["chat"], max_tokens_limit))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        render = ChatRender(m.tokenizer, req.stream, req.stream_options)
        return await run_job(engine, request, m, prompts, cfg, req.n, stop_strings(req.stop) + chat_template["stop"],
                             logprobs, render, chat=True)

    return app


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _token_text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


class CompletionRender:
    """/v1/completions bodies: the full response and the stream's chunks."""

    object_full = object_chunk = "text_completion"

    def __init__(self, tokenizer, stream: bool, stream_options):
        self.tokenizer, self.stream = tokenizer, stream
        self.include_usage = bool(stream_options and stream_options.include_usage)

    def chunk_head(self, head: dict) -> dict:
        return {**head, "object": self.object_chunk}

    @staticmethod
    def logprobs(tokens: list[dict]) -> dict:
        texts = [_token_text(t["bytes"]) for t in tokens]
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
        return {"tokens": texts, "token_logprobs": [t["logprob"] for t in tokens],
                "top_logprobs": [{_token_text(b): v for _, b, v in t["top"]} for t in tokens],
                "text_offset": offsets}

    def opening(self, head, n_choices, echo_texts, n):
        if echo_texts:
            for i in range(n_choices):
                yield {**self.chunk_head(head), "choices": [
                    {"index": i, "text": echo_texts[i // n], "logprobs": None, "finish_reason": None}]}

    def chunk(self, head, ev) -> dict:
        lp = None if ev.token is None else self.logprobs([ev.token])
        return {**self.chunk_head(head),
                "choices": [{"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish}]}

    def full(self, head, texts, tokens, finish, usage, choices) -> dict:
        out = []
        for i, text in enumerate(texts):
            lp = self.logprobs(tokens[i]) if tokens[i] else None
            out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish[i]})
        return {**head, "object": self.object_full, "choices": out, "usage": usage}


class ChatRender(CompletionRender):
    """/v1/chat/completions bodies."""

    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    @staticmethod
    def logprobs(tokens: list[dict]) -> dict:
        def entry(b: bytes, v: float) -> dict:
            return {"token": _token_text(b), "logprob": v, "bytes": list(b)}

        return {"content": [{**entry(t["bytes"], t["logprob"]),
                             "top_logprobs": [entry(b, v) for _, b, v in t["top"]]} for t in tokens]}

    def opening(self, head, n_choices, echo_texts, n):
        for i in range(n_choices):
            yield {**self.chunk_head(head), "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}

    def chunk(self, head, ev) -> dict:
        lp = None if ev.token is None else self.logprobs([ev.token])
        delta = {"content": ev.text} if ev.text or not ev.finish else {}
        return {**self.chunk_head(head),
                "choices": [{"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish}]}

    def full(self, head, texts, tokens, finish, usage, choices) -> dict:
        out = [{"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(tokens[i]) if tokens[i] else None, "finish_reason": finish[i]}
               for i, text in enumerate(texts)]
        return {**head, "object": self.object_full, "choices": out, "usage": usage}


# ----------------------------------------------------------------------------- the command


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a PicoError naming why not (port in use, unknown host)."""
    if not 0 <= port <= 65535:
        raise PicoError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PicoError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise PicoError(f"cannot listen on {host}:{port}: {why}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(runs: list[str], host: str = "127.0.0.1", port: int = 8000, *, device_id: str = "cpu",
          precision: str = "auto", decoder: str = "auto", max_active: int = 8, max_tokens_limit: int = 1024,
          chat_template: Optional[dict] = None, log=print) -> int:
    import uvicorn

    from .protocol import load_chat_template

    if max_active < 1:
        raise PicoError(f"--max_active must be >= 1, got {max_active}")
    if max_tokens_limit < 1:
        raise PicoError(f"--max_tokens_limit must be >= 1, got {max_tokens_limit}")
    template = chat_template if chat_template is not None else load_chat_template(None)
    device = resolve_device(device_id)
    models = load_models(runs, device, precision, decoder)
    sock = bind(host, port)
    engine = Engine(max_active=max_active, max_new_tokens=max_tokens_limit)
    app = create_app(models, engine, template, max_tokens_limit)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    for m in models:
        log(f"serving {m.run_dir} as {m.id!r}")
    log(f"listening on {url}  (playground: {url}/, OpenAI API: {url}/v1; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0
