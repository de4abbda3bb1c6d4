"""OpenAI's API as retro-ray serves it: the request schemas, their limits, and errors in OpenAI's
format. A hostile body is refused here, before any retrieval or model work, cheapest checks first:
size (while it is read), nesting depth (before it is parsed), JSON that only Python accepts (NaN,
Infinity), text no tokenizer takes (lone surrogates), then every field's type and range, each
range what the sampler can use. Imports no Ray.
"""

import json
import os
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from retro_ray.core.config import ServeConfig
from retro_ray.core.errors import UserError


# -- errors in OpenAI's format ---------------------------------------------------------------------


class APIError(Exception):
    """A request the API refuses: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


api = FastAPI(title="retro-ray", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Unknown routes and methods, in the same format."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return APIError(e.status_code, str(e.detail), code=code).response()


# -- requests ------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """The fields chat and completion requests share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Choice j samples with ``seed + j`` (torch's generators take 64-bit seeds)."""
    retrieval: Literal["encoder", "prompt", "both", "question", "off"] | None = None
    passages: int | None = Field(None, ge=0)
    search: Literal["dense", "bm25", "hybrid"] | None = None
    ignore_eos: bool = False
    """Decode past the end of text up to ``max_tokens`` (vLLM's field of the same name)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text (vLLM's field and default)."""

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"at most 4 stop sequences, got {len(stop)}", "stop")
        return [s for s in stop if s]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    short_answer: bool = False
    """Ask the last user message as a short-answer question, in the tuning template's QA form."""


class RetrieveRequest(_Strict):
    query: str | list[str]
    k: int | None = Field(None, ge=1)
    model: str | None = None
    search: Literal["dense", "bm25", "hybrid"] | None = None


async def read_json(request: Request, limit: int, schema: type[BaseModel]) -> Any:
    """The body, at most ``limit`` bytes, parsed as JSON and validated by ``schema``."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the request body is larger than the limit of {limit} bytes", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than the limit of {limit} bytes", code="body_too_large")
    if _depth(body) > MAX_DEPTH:  # before parsing: a deep body costs the parser, not us
        raise APIError(400, f"the body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    _check_text(data, "")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}", param, code=first["type"]) from None


MAX_DEPTH = 16


def _depth(body: bytes) -> int:
    """How deep a JSON body nests (brackets outside strings)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in body.decode("utf-8", errors="replace"):
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _check_text(value, path: str) -> None:
    """Every string must be text a tokenizer can take: no lone surrogates (``"\\ud800"``)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{path or 'body'}: not valid Unicode text (a lone surrogate)", path or None,
                           "invalid_text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}.{i}")


def failure(news: dict, param: str) -> APIError:
    """A request that failed while decoding (``{"error", "fault"}`` of its stream): a 503 when
    it is the server's fault (retrieval or the model failed), else a 400."""
    if news["fault"] == "server":
        return APIError(503, news["error"], code="generation_failed", kind="server_error")
    return APIError(400, news["error"], param)


def usage(choices: list[dict], results: list[dict]) -> dict:
    """Prompt tokens once per prompt (the n choices of one prompt share it), completion tokens of all."""
    prompt = sum({c["prompt"]: c["prompt_tokens"] for c in choices}.values())
    completion = sum(r.get("completion_tokens", 0) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def api_key(sc: ServeConfig) -> str | None:
    """The configured API key: the secret file's content, else the environment variable."""
    if sc.api_key_file:
        try:
            key = Path(sc.api_key_file).read_text().strip()
        except OSError as e:
            raise UserError(f"serve.api_key_file: cannot read {sc.api_key_file}: {e.strerror}") from None
        if not key:
            raise UserError(f"serve.api_key_file: {sc.api_key_file} is empty")
        return key
    return os.environ.get(sc.api_key_env) or None
