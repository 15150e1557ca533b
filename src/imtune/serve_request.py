"""The OpenAI chat-completions request, as imtune serve accepts it: validated by pydantic (unknown fields refused
rather than ignored), unsupported parameters answered with an OpenAI-shaped 400 (`ApiError`), contents as Messages."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .types import Message

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... : harmless
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = Field(None)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None


class ApiError(Exception):
    """An answer with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_request(raw: bytes) -> ChatRequest:
    """The validated request, or ApiError(400) naming the first problem."""
    try:
        req = ChatRequest.model_validate_json(raw or b"null")
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else ""
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {err['msg']}") from None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "model_type":
            raise ApiError(400, "the body must be a JSON object") from None
        raise ApiError(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", param=param or None) from None
    if (req.n or 1) != 1:
        raise ApiError(400, "n > 1 is not supported by imtune serve: send n separate requests", param="n")
    if req.logprobs or req.top_logprobs:
        raise ApiError(400, "logprobs are not supported by imtune serve", param="logprobs")
    if req.response_format and req.response_format.get("type") != "text":
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported (no JSON mode)",
                       param="response_format")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported (leave them 0)",
                       param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if isinstance(req.stop, list) and len(req.stop) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
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
