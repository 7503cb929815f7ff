"""The OpenAI wire format: request bodies, the error shape, and a request's output text.

Request models type the fields we use and allow any other (clients send fields we do
not know; ignoring them is what OpenAI-compatible servers do). Fields are strict, so a
string where a number belongs is a 400, not a silent conversion.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None):
    return APIError(400, message, param, code)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Sampled(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None          # extension (vLLM): -1 or 0 = off
    min_p: float | None = None        # extension (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    return_token_ids: bool = False    # extension (vLLM): prompt_token_ids and token_ids


class CompletionRequest(_Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class LoadLoraRequest(_Body):      # vLLM's POST /v1/load_lora_adapter
    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Body):    # vLLM's POST /v1/unload_lora_adapter
    lora_name: str


class Message(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampled):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def message_dicts(messages: list[Message]) -> list[dict]:
    """Messages as the template sees them; content given as parts ([{"type": "text",
    "text": ...}]) is joined into one string, the only kind a text model reads."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=False)
        if isinstance(m.content, list):
            if any(p.get("type") != "text" for p in m.content):
                raise bad_request("only text content parts are supported",
                                  "messages.content")
            d["content"] = "".join(str(p.get("text", "")) for p in m.content)
        elif m.content is None:
            d["content"] = ""
        out.append(d)
    return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) from FastAPI's validation errors (the first one tells enough)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return f"{where}{e.get('msg', 'invalid value')}", param


class Output:
    """One choice's generated tokens and the text a client may see.

    The text is the decode of all tokens so far (so multi-byte characters and merges
    come out right), without a final stop token, cut before the first stop string.
    While the request runs, `delta()` holds back a dangling partial UTF-8 character and
    any tail that could still grow into a stop string, so no stop string leaks out."""

    def __init__(self, tokenizer, stop_tokens=(), stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_tokens = set(stop_tokens)
        self.stop_strings = [s for s in stop_strings if s]
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False      # a stop string was seen
        self._sent = 0

    def add(self, tokens: list[int]) -> None:
        self.tokens += tokens
        if self.tokenizer is None or self.stopped:
            return
        ids = self.tokens
        if ids and ids[-1] in self.stop_tokens:  # OpenAI shows no EOS text
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            text, self.stopped = text[:min(cuts)], True
        self.text = text

    def delta(self, final: bool) -> str:
        text = self.text
        if not final and not self.stopped:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._held(text)]
        new = text[self._sent:]
        self._sent = max(self._sent, len(text))
        return new

    def _held(self, text: str) -> int:
        """Length of the longest tail of text that begins some stop string."""
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
