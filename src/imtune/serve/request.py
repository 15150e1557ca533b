"""The OpenAI chat-completions request, as imtune serve accepts it: validated by pydantic (unknown fields refused
rather than ignored), unsupported parameters answered with an OpenAI-shaped 400 (`ApiError`), contents as Messages.
Before any of that, on every path (`guard`, an ASGI middleware): the API key (401), a JSON Content-Type on POST (415)
and a body within MAX_BODY bytes (413), checked on the Content-Length first and counted as it arrives (`read_body`).

Every field is bounded here (a range, a length, a count), so nothing a client sends reaches the model or torch out
of range: an unbounded `seed` past 64 bits once made torch.manual_seed raise before the stream it feeds was ended,
and every later request waited for the model forever."""
from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imtune.types import Message

MAX_BODY = 4 * 1024 * 1024  # bytes: ~1M tokens of text, beyond any context; tokenizing it takes seconds, not minutes
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_MESSAGES = 1024
MAX_CONTENT = 2**21  # characters in one message: more than any context this server takes (~4 characters a token)
MAX_PARTS = 256  # content parts in one message
MAX_NAME = 256  # characters in model, user and message names
MAX_STOP = 4  # stop sequences (OpenAI's limit)
INT64 = 2**63  # seed: OpenAI's range, which torch.manual_seed accepts

Text = Annotated[str, Field(max_length=MAX_CONTENT)]
Name = Annotated[str, Field(max_length=MAX_NAME)]
StopText = Annotated[str, Field(max_length=256)]
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")  # image_url, ...: such parts are refused by type, never read
    type: Annotated[str, Field(max_length=64)]
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tool_call_id, ...: never read (the body's size bounds them)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] | None = None
    name: Name | None = None


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks: accepted, not done


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")  # json_schema, ...: refused by type, never read
    type: Annotated[str, Field(max_length=64)]


class ChatRequest(BaseModel):
    model_config = STRICT
    model: Name | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, lt=INT64)  # and at most the server's --max-tokens-limit
    max_completion_tokens: int | None = Field(None, ge=1, lt=INT64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: Name | None = None


FIELDS = {f for m in (ChatRequest, ChatMessage, TextPart, StreamOptions, ResponseFormat) for f in m.model_fields}


class ApiError(Exception):
    """An answer with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _first_problem(e: ValidationError) -> tuple[dict, list[str]]:
    """The error to report and its location. A value that fits no branch of a union (`stop`: a string or a list)
    fails every branch; the branch it was meant for is the one that failed on something other than its type."""
    errors = e.errors()
    err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
    loc = err.get("loc", ())
    if err["type"] != "extra_forbidden":  # the unknown field's own name is the last part
        loc = [p for p in loc if isinstance(p, int) or p in FIELDS]  # not the union's branch names
    return err, [str(p) for p in loc]


def parse_request(raw: bytes) -> ChatRequest:
    """The validated request, or ApiError(400) naming the first problem."""
    try:
        req = ChatRequest.model_validate_json(raw or b"null")
    except ValidationError as e:
        err, loc = _first_problem(e)
        param = loc[0] if loc else ""
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg']}") from None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {'.'.join(loc)}", param=param) from None
        if err["type"] == "model_type" and not loc:
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", param=param or None) from None
    if (req.n or 1) != 1:
        raise ApiError(400, "n > 1 is not supported by imtune serve: send n separate requests", param="n")
    if req.logprobs or req.top_logprobs:
        raise ApiError(400, "logprobs are not supported by imtune serve", param="logprobs")
    if req.response_format and req.response_format.type != "text":
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported (no JSON mode)",
                       param="response_format")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported (leave them 0)",
                       param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    return req


def messages_of(req: ChatRequest) -> list[Message]:
    out = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):  # content parts: the text ones
            if any(p.type != "text" for p in content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            content = "".join(p.text or "" for p in content)
        out.append(Message(ROLE_ALIASES[m.role], content or ""))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The HTTP request around the JSON: key, media type, size.
def key_matches(key: str, authorization: str | None) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), key.encode())


def refusal(scope, api_key: str | None) -> ApiError | None:
    """Why this request is refused before any route sees it, or None. /health needs no key (it tells a client
    without one only that the server is up)."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if api_key and scope["path"] != "/health" and not key_matches(api_key, headers.get("authorization")):
        return ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if scope["method"] != "POST":
        return None
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":  # a web page may POST text/plain anywhere without asking first (no preflight)
        return ApiError(415, f"Content-Type must be application/json, not {media[:64]!r}")
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        return ApiError(413, f"request body over {MAX_BODY} bytes", headers={"Connection": "close"})
    return None


def guard(app, api_key: str | None, on_refusal):
    """ASGI middleware: `refusal` before the app reads a byte of the body; `on_refusal(ApiError)` is the answer."""
    async def guarded(scope, receive, send):
        refused = refusal(scope, api_key) if scope["type"] == "http" else None
        if refused is None:
            await app(scope, receive, send)
        else:
            await on_refusal(refused)(scope, receive, send)
    return guarded


async def read_body(request, timeout: float) -> bytes:
    """The body, counted while it arrives: 413 past MAX_BODY (a chunked body has no Content-Length to check first),
    408 when it is not all there within `timeout` seconds. Starlette's request.stream() yields the http.request
    messages as uvicorn receives them, and uvicorn stops reading the socket while 64 KiB wait unread, so a body is
    held only up to the bound. Counting here rather than in a middleware: this is the one route that reads a body,
    and an error raised from inside a middleware's `receive` would reach the client as a 500."""
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise ApiError(413, f"request body over {MAX_BODY} bytes", headers={"Connection": "close"})
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(499, "the client closed the connection while sending its body") from None
    return b"".join(chunks)
