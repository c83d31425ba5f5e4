"""The OpenAI wire format: request bodies checked field by field, and the response objects and stream chunks.

Checked by hand rather than with pydantic models so that every refusal is OpenAI's 400 shape,
`{"error": {"message", "type", "param", "code"}}`, naming the field, instead of FastAPI's 422 list.
Unknown fields are ignored (clients send more than a server uses); fields leantrain cannot honour
(n > 1, logprobs, penalties, echo) are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

MAX_PROMPTS = 16  # prompts in one completions request
MAX_STOP = 4      # as OpenAI


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity parse, and are refused by the range checks)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON ({type(e).__name__}: {e}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body is a JSON {type(body).__name__}; send a JSON object",
                       code="invalid_json")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_error(param: str, want: str, value: Any) -> APIError:
    return APIError(400, f"{param} must be {want}, not {json.dumps(value)[:80]}", param, "invalid_type")


@dataclass
class Params:
    """What a generation request asked for, checked; max_tokens is settled once the prompt length is known."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def sampling_params(body: dict[str, Any], default_max_tokens: int | None, *, chat: bool) -> Params:
    """The sampling fields shared by both endpoints (OpenAI's names and defaults; top_k and ignore_eos as vLLM)."""
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens):
        raise _type_error(name, "an integer", max_tokens)
    elif max_tokens < 1:
        raise APIError(400, f"{name} = {max_tokens} is not allowed; expected an integer >= 1", name, "invalid_value")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature):
        raise _type_error("temperature", "a number", temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(400, f"temperature = {temperature} is not allowed; expected a finite number >= 0 (0 is "
                       "greedy)", "temperature", "invalid_value")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p):
        raise _type_error("top_p", "a number", top_p)
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise APIError(400, f"top_p = {top_p} is not allowed; expected a number in (0, 1]", "top_p", "invalid_value")
    top_k = body.get("top_k", 0)
    top_k = 0 if top_k is None else top_k
    if not _is_int(top_k):
        raise _type_error("top_k", "an integer", top_k)
    if top_k < 0:
        raise APIError(400, f"top_k = {top_k} is not allowed; expected an integer >= 0 (0: no top-k)", "top_k",
                       "invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _type_error("seed", "an integer", seed)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise _type_error("stop", f"a non-empty string or a list of at most {MAX_STOP} of them", body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise _type_error("stream", "a boolean", stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _type_error("stream_options", 'an object like {"include_usage": true}', body.get("stream_options"))
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _type_error("ignore_eos", "a boolean", ignore_eos)
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise APIError(400, f"n = {json.dumps(n)} is not supported; send n = 1 (one choice per prompt)", "n",
                       "unsupported_value")
    for param, fine in (("logprobs", (None, False)), ("top_logprobs", (None, 0)), ("echo", (None, False)),
                        ("best_of", (None, 1)), ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0)),
                        ("logit_bias", (None, {})), ("suffix", (None, ""))):
        if param in body and body[param] not in fine:
            raise APIError(400, f"{param} is not supported by leantrain serve; leave it out", param,
                           "unsupported_value")
    return Params(max_tokens, float(temperature), float(top_p), top_k, seed, stop, bool(stream),
                  bool(options.get("include_usage", False)), ignore_eos)


CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_grammar")
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object


@dataclass(frozen=True)
class Rule:
    """A request's output constraint: kind as `model.constrained` names it, its source text, the field it came
    from (named in every error about it)."""

    kind: str
    source: str
    param: str


def constraint_rule(body: dict[str, Any]) -> Rule | None:
    """OpenAI's `response_format` (text, json_object, json_schema) or vLLM's `guided_json` (a schema object or
    its text), `guided_regex`, `guided_grammar` (EBNF, xgrammar's GBNF dialect); at most one of them."""
    given = [f for f in CONSTRAINT_FIELDS if body.get(f) is not None]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "text":
        given.remove("response_format")  # OpenAI's default: no constraint
    if len(given) > 1:
        raise APIError(400, f"{' and '.join(given)} were both sent; send at most one output constraint", given[1],
                       "conflicting_constraints")
    if not given:
        return None
    field_name = given[0]
    value = body[field_name]
    if field_name == "response_format":
        kinds = '"text", "json_object" or "json_schema"'
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise _type_error("response_format", f'an object with "type" {kinds}', value)
        if value["type"] == "json_object":
            return Rule("json_schema", JSON_OBJECT_SCHEMA, "response_format")
        if value["type"] != "json_schema":
            raise APIError(400, f"response_format.type = {json.dumps(value['type'])[:40]} is not supported; use "
                           f"{kinds}", "response_format.type", "invalid_value")
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _type_error("response_format.json_schema.schema", "a JSON schema object", schema)
        return Rule("json_schema", json.dumps(schema), "response_format.json_schema.schema")
    if field_name == "guided_json":
        if isinstance(value, dict):
            return Rule("json_schema", json.dumps(value), field_name)
        if not isinstance(value, str):
            raise _type_error(field_name, "a JSON schema object (or its text)", value)
        return Rule("json_schema", value, field_name)
    if not isinstance(value, str) or not value:
        raise _type_error(field_name, "a non-empty string", value)
    return Rule("regex" if field_name == "guided_regex" else "grammar", value, field_name)


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    else:
        raise _type_error("prompt", "a non-empty string, list of strings or list of token ids", prompt)
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"{len(prompts)} prompts in one request; send at most {MAX_PROMPTS}", "prompt",
                       "too_many_prompts")
    if any(p == "" for p in prompts):
        raise APIError(400, "prompt is empty; send some text", "prompt", "invalid_value")
    return prompts


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """`messages`: role system/user/assistant, content a string or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list of {role, content} objects", messages)
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object with role and content", m)
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role = {json.dumps(role)} is not supported; use system, user or "
                           "assistant", f"{where}.role", "invalid_value")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _type_error(f"{where}.content", 'a string or a list of {"type": "text", "text": ...} parts',
                                  content)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string", content)
        out.append({"role": role, "content": content})
    return out


# ---- responses ------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
               ) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_completion(rid: str, model: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int
                    ) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, reason: str | None
                     ) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str], reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {json}` (or `data: [DONE]`) and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()
