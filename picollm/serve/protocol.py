"""The OpenAI request bodies the server accepts, and what is wrong with a bad one.

Each request is parsed strictly: unknown fields, wrong types and out-of-range values are an ApiError
(HTTP 400, or 404 for an unknown model) with an OpenAI-style body, never a guess. Standard OpenAI fields
pico-llm does not implement (penalties, logit_bias, suffix, best_of > n) are accepted only at their
neutral value, so a request is never answered as if they had been applied.

The chat template. Base models have no chat format, so messages are laid out as plain text:

    {system}\\n\\n          (a system message, if any)
    User: {content}\\n      (each user message)
    Assistant: {content}\\n (each earlier assistant message)
    Assistant:             (what the model continues)

and generation stops at "\\nUser:". `pico-llm serve --chat_template FILE.json` replaces it: a JSON object
with any of the keys "system", "user", "assistant" (each a string with "{content}"), "generation" (the
text the model continues) and "stop" (a list of strings).
"""

from __future__ import annotations

import json
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import PicoError

MAX_STOPS = 4  # as OpenAI
MAX_N = 16
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # OpenAI's limits on alternatives per token

DEFAULT_CHAT_TEMPLATE = {
    "system": "{content}\n\n",
    "user": "User: {content}\n",
    "assistant": "Assistant: {content}\n",
    "generation": "Assistant:",
    "stop": ["\nUser:"],
}


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: Optional[str] = None  # may be left out when the server serves one model
    max_tokens: Optional[int] = None
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: Optional[int] = None  # an extension (vLLM, llama.cpp): None, 0 or -1 is off
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None  # the caller's label for its end user: recorded nowhere, changes nothing
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    truncate_prompt_tokens: Optional[int] = None  # vLLM's extension: keep the prompt's last N tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None  # alternatives per token, 0..5
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, cls: type[_Sampling]) -> _Sampling:
    """The request body as cls, or an ApiError saying what is wrong with it."""
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)  # NaN and Infinity are not JSON
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(obj).__name__}")
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str")))
        where = where or ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {where!r}", param=where) from None
        if err["type"] == "missing":
            raise ApiError(400, f"missing required field {where!r}", param=where) from None
        got = json.dumps(err.get("input"))[:80]
        raise ApiError(400, f"{where}: {err['msg'].lower()} (got {got})", param=where) from None


def check_sampling(req: _Sampling, max_tokens: Optional[int], limit: int) -> None:
    """Range checks the types cannot express; max_tokens is the request's own (None: the default)."""

    def bad(param: str, message: str):
        raise ApiError(400, message, param=param)

    if max_tokens is not None and max_tokens < 1:
        bad("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens is not None and max_tokens > limit:
        bad("max_tokens", f"max_tokens {max_tokens} is past this server's limit of {limit} (serve --max_tokens_limit)")
    if req.temperature < 0:
        bad("temperature", f"temperature must be >= 0, got {req.temperature}")
    if not 0.0 < req.top_p <= 1.0:
        bad("top_p", f"top_p must be in (0, 1], got {req.top_p}")
    if req.top_k is not None and req.top_k < -1:
        bad("top_k", f"top_k must be >= 1 (or 0 / -1 / null: off), got {req.top_k}")
    if not 1 <= req.n <= MAX_N:
        bad("n", f"n must be in 1..{MAX_N}, got {req.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            bad(name, f"{name} is not supported by pico-llm (only 0)")
    if req.logit_bias:
        bad("logit_bias", "logit_bias is not supported by pico-llm (only {} or null)")
    stops = stop_strings(req.stop)
    if len(stops) > MAX_STOPS:
        bad("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        bad("stop", "a stop string may not be empty")
    if req.stream_options is not None and not req.stream:
        bad("stream_options", "stream_options needs stream: true")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        bad("truncate_prompt_tokens", f"truncate_prompt_tokens must be >= 1, got {req.truncate_prompt_tokens}")


def check_completion(req: CompletionRequest, limit: int) -> None:
    check_sampling(req, req.max_tokens, limit)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS["completions"]:
        raise ApiError(400, f"logprobs must be in 0..{MAX_LOGPROBS['completions']}, got {req.logprobs}",
                       param="logprobs")
    if req.suffix:
        raise ApiError(400, "suffix (insertion) is not supported by pico-llm", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of is not supported by pico-llm (leave it out, or equal to n)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "echo with logprobs (the prompt's logprobs) is not supported by pico-llm", param="echo")


def check_chat(req: ChatRequest, limit: int) -> Optional[int]:
    """The chat request's max tokens (max_completion_tokens or max_tokens), checked."""
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    check_sampling(req, max_tokens, limit)
    if not req.messages:
        raise ApiError(400, "messages must hold at least one message", param="messages")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS["chat"]:
            raise ApiError(400, f"top_logprobs must be in 0..{MAX_LOGPROBS['chat']}, got {req.top_logprobs}",
                           param="top_logprobs")
    return max_tokens


def stop_strings(stop: Union[str, list[str], None]) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


# ----------------------------------------------------------------------------- the chat template


def load_chat_template(path: Optional[str]) -> dict:
    """DEFAULT_CHAT_TEMPLATE, or it updated from a JSON file (checked: a PicoError names what is wrong)."""
    if path is None:
        return dict(DEFAULT_CHAT_TEMPLATE)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise PicoError(f"--chat_template {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise PicoError(f"--chat_template {path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PicoError(f"--chat_template {path}: must be a JSON object")
    unknown = set(obj) - set(DEFAULT_CHAT_TEMPLATE)
    if unknown:
        raise PicoError(f"--chat_template {path}: unknown key {sorted(unknown)[0]!r}; "
                        f"keys: {', '.join(DEFAULT_CHAT_TEMPLATE)}")
    for key in ("system", "user", "assistant"):
        if key in obj and (not isinstance(obj[key], str) or "{content}" not in obj[key]):
            raise PicoError(f"--chat_template {path}: {key!r} must be a string holding {{content}}")
    if "generation" in obj and not isinstance(obj["generation"], str):
        raise PicoError(f"--chat_template {path}: 'generation' must be a string")
    if "stop" in obj and not (isinstance(obj["stop"], list) and all(isinstance(s, str) and s for s in obj["stop"])):
        raise PicoError(f"--chat_template {path}: 'stop' must be a list of non-empty strings")
    return {**DEFAULT_CHAT_TEMPLATE, **obj}


def chat_prompt(messages: list[Message], template: dict) -> str:
    """The messages laid out by the template, ending with the text the model continues."""
    parts = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        role = "system" if m.role == "developer" else m.role
        parts.append(template[role].replace("{content}", content))
    return "".join(parts) + template["generation"]
