"""The FastAPI app: OpenAI's completions and chat completions over one Scheduler.

    app = create_app(scheduler, tokenizer=tok, model_name="tiny", stop_tokens=(eos,))
    uvicorn.run(app, port=8000)          # the lifespan starts and stops the engine thread

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. A request's `model` names the base model or one of the adapters the
scheduler was built with (`adapters={name: index}`, as vLLM's --lora-modules): its rows run
that adapter; /v1/models lists the base and each adapter with its `parent`. Errors are
OpenAI's {"error": {message, type, param, code}} for every status (400 bad request, 401 API key, 404 route, 429 queue full, 503 shutting down).
A client that goes away (closes a stream, drops a connection) has its request cancelled,
so its KV pages are freed at once rather than when its tokens run out.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxlm.infer.scheduler import Request as SchedRequest
from jaxlm.ops.sampling import Sampling

from .chat import ChatTemplate, encode_prompt
from .loop import Aborted, Overloaded, ServingLoop, ShuttingDown
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, LoadLoraRequest, Output,
                       UnloadLoraRequest, bad_request, message_dicts, validation_message)

# how often a non-streaming request looks whether its client is still there (seconds)
DISCONNECT_POLL = 1.0


def create_app(scheduler, *, tokenizer=None, model_name: str = "jaxlm", stop_tokens=(),
               chat_template: ChatTemplate | None = None, api_key: str | None = None,
               max_queue: int = 256, shutdown_timeout: float = 10.0,
               adapters: dict[str, int] | None = None) -> FastAPI:
    """An app serving `scheduler` (a jaxlm.infer.scheduler.Scheduler). tokenizer None:
    token-id prompts only. stop_tokens end every request (the model's EOS ids).
    chat_template: default the built-in one (chat.DEFAULT_TEMPLATE) when there is a
    tokenizer. adapters: model name → the scheduler's adapter index, for requests that
    name an adapter. The engine thread runs between the app's startup and shutdown."""
    metrics = Metrics()
    serving = ServingLoop(scheduler, max_queue=max_queue, metrics=metrics)
    if chat_template is None and tokenizer is not None:
        chat_template = ChatTemplate()
    adapters = dict(adapters or {})
    if model_name in adapters:
        raise ValueError(f"adapter name {model_name!r} is the base model's name; give the "
                         f"adapter another one")
    bad = {n: i for n, i in adapters.items() if i not in scheduler.adapter_ids}
    if bad:
        raise ValueError(f"adapters {bad} name no adapter of the scheduler (its ids: "
                         f"{scheduler.adapter_ids})")
    api = _API(serving, tokenizer, model_name, tuple(stop_tokens), chat_template, adapters)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.start()
        yield
        # off the event loop, which must keep delivering the last requests' tokens
        await asyncio.to_thread(serving.stop, shutdown_timeout)

    app = FastAPI(title="jaxlm", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving, app.state.scheduler, app.state.metrics = serving, scheduler, metrics
    _install_error_handlers(app)
    auth = [Depends(_api_key_check(api_key))]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=auth)
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": api.model_cards()}

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora(body: LoadLoraRequest):
        return PlainTextResponse(await api.load_adapter(body.lora_name, body.lora_path))

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora(body: UnloadLoraRequest):
        return PlainTextResponse(await api.unload_adapter(body.lora_name))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request):
        return await api.chat(body, request)

    return app


def _api_key_check(api_key: str | None):
    async def check(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer "
                           "KEY'", code="invalid_api_key")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    def reply(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return reply(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):  # FastAPI's 422 → OpenAI's 400
        message, param = validation_message(list(e.errors()))
        return reply(bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}" if e.status_code == 404
                   else str(e.detail))
        return reply(APIError(e.status_code, message))


class _API:
    """The endpoints' logic, over one ServingLoop."""

    def __init__(self, serving: ServingLoop, tokenizer, model_name: str, stop_tokens,
                 chat_template, adapters: dict[str, int]):
        self.serving, self.tokenizer, self.model_name = serving, tokenizer, model_name
        self.stop_tokens, self.template = stop_tokens, chat_template
        self.adapters = adapters
        self.created = int(time.time())

    def model_cards(self) -> list[dict]:
        """The base model, then each adapter with the base as its parent (vLLM's cards)."""
        card = {"object": "model", "created": self.created, "owned_by": "jaxlm",
                "max_model_len": self.serving.sched.max_len}
        return ([{"id": self.model_name, "root": self.model_name, "parent": None, **card}]
                + [{"id": name, "root": name, "parent": self.model_name, **card}
                   for name in self.adapters])

    def adapter(self, model: str | None) -> int:
        """The adapter index a request's `model` names (-1: the base); a 400 naming the
        served models if it names none of them."""
        if model is None or model == self.model_name:
            return -1
        if model in self.adapters:
            return self.adapters[model]
        served = ", ".join(repr(m) for m in [self.model_name, *self.adapters])
        raise bad_request(f"the model {model!r} does not exist; this server serves "
                          f"{served}", "model", "model_not_found")

    async def load_adapter(self, name: str, path: str) -> str:
        """Add a PEFT adapter under `name` at run time (the scheduler's free slot, no
        compile); a 400 naming the problem otherwise."""
        if not name or name == self.model_name or name in self.adapters:
            raise bad_request(f"the adapter name {name!r} is taken or empty; pick another",
                              "lora_name")
        from jaxlm.model.io.peft import read_peft_config
        try:
            read_peft_config(path)
            self.adapters[name] = await self.serving.call(lambda s: s.load_adapter(path))
        except (ValueError, FileNotFoundError) as e:
            raise bad_request(str(e), "lora_path") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload_adapter(self, name: str) -> str:
        if name not in self.adapters:
            raise APIError(404, f"the adapter {name!r} is not loaded", "lora_name",
                           "model_not_found")
        try:
            await self.serving.call(lambda s: s.unload_adapter(self.adapters[name]))
        except ValueError as e:
            raise bad_request(str(e), "lora_name") from None
        del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    # Endpoints -----------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request):
        if body.logprobs is not None:
            raise bad_request("logprobs are not supported", "logprobs")
        if body.echo or (body.best_of or 1) != 1 or body.suffix is not None:
            raise bad_request("echo, best_of and suffix are not supported")
        prompt = self._prompt_ids(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await self._run(body, rid, prompt, max_tokens, request, chat=False)

    async def chat(self, body: ChatRequest, request: Request):
        if body.logprobs or body.top_logprobs is not None:
            raise bad_request("logprobs are not supported", "logprobs")
        if self.tokenizer is None or self.template is None:
            raise bad_request("this model has no tokenizer, so chat messages cannot be "
                              "encoded; use /v1/completions with token-id prompts")
        try:
            text = self.template.render(message_dicts(body.messages))
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        prompt = encode_prompt(self.tokenizer, text)
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        if max_tokens is None:  # OpenAI's default: whatever the context has left
            max_tokens = max(self.serving.sched.max_len - len(prompt), 1)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._run(body, rid, prompt, max_tokens, request, chat=True)

    # Building and running a request ------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request(f"one prompt per request is supported, got {len(prompt)}",
                                  "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer; send the prompt as a list "
                                  "of token ids", "prompt")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _request(self, body, rid: str, prompt: list[int], max_tokens: int):
        adapter = self.adapter(body.model)
        if body.n not in (None, 1):
            raise bad_request(f"n must be 1 (one choice per request), got {body.n}", "n")
        if max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}",
                              "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if stops and self.tokenizer is None:
            raise bad_request("stop strings need a tokenizer, and this model has none",
                              "stop")
        sampling = _sampling(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return SchedRequest(prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                            seed=seed, stop_tokens=self.stop_tokens,
                            stop_strings=tuple(s for s in stops if s), id=rid,
                            adapter=adapter)

    async def _start(self, req):
        try:
            stream = self.serving.submit(req)
        except Overloaded as e:
            raise APIError(429, str(e), code="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e)) from None
        try:
            await stream.accepted()
        except ValueError as e:  # the Scheduler's check: prompt too long, bad ids, ...
            raise bad_request(str(e), "prompt") from None
        except Aborted as e:
            raise APIError(503, str(e)) from None
        except BaseException:
            stream.cancel()
            raise
        return stream

    async def _run(self, body, rid, prompt, max_tokens, request, chat: bool):
        req = self._request(body, rid, prompt, max_tokens)
        stream = await self._start(req)
        out = Output(self.tokenizer, self.stop_tokens, req.stop_strings)
        shape = _Shape(rid, body.model or self.model_name, chat, body.return_token_ids,
                       prompt)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(stream, out, shape, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        reason = await self._collect(stream, out, request)
        return shape.whole(out, reason)

    async def _collect(self, stream, out: Output, request: Request) -> str | None:
        """Wait for the whole output; its finish reason (None: the client left)."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(stream.next(), DISCONNECT_POLL)
                except TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                out.add(event.tokens)
                if out.stopped:
                    return "stop"
                if event.finished:
                    return event.reason or "stop"
        except Aborted as e:
            raise APIError(503, str(e)) from None
        finally:
            stream.cancel()  # a no-op once finished; else frees the pages now

    async def _sse(self, stream, out: Output, shape: "_Shape", usage: bool):
        """Server-sent events; a closed connection cancels the generator (CancelledError
        or GeneratorExit at its await), and `finally` cancels the request."""
        try:
            if shape.chat:
                yield _sse(shape.chunk(role=True))
            while True:
                event = await stream.next()
                out.add(event.tokens)
                reason = "stop" if out.stopped else (
                    (event.reason or "stop") if event.finished else None)
                text = out.delta(final=reason is not None)
                if text or reason or (shape.token_ids and event.tokens):
                    yield _sse(shape.chunk(text, event.tokens, reason))
                if reason:
                    break
            if usage:
                yield _sse(shape.usage_chunk(out))
            yield "data: [DONE]\n\n"
        except Aborted as e:
            yield _sse(APIError(503, str(e)).body())
        finally:
            stream.cancel()


def _sampling(body) -> Sampling | None:
    """The Sampling the fields ask for (None: greedy); a bad value is a 400 naming it."""
    top_k = None if body.top_k in (None, 0, -1) else body.top_k
    temperature = 1.0 if body.temperature is None else body.temperature
    try:
        sampling = Sampling(temperature, top_k, body.top_p, body.min_p)
    except ValueError as e:
        message = str(e).replace("Sampling.", "")
        param = message.split(" ", 1)[0]
        raise bad_request(message, param) from None
    return None if sampling.greedy else sampling


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Shape:
    """The JSON of one request's responses: whole, or chunk by chunk."""

    def __init__(self, rid: str, model: str, chat: bool, token_ids: bool, prompt):
        self.rid, self.model, self.chat, self.token_ids = rid, model, chat, token_ids
        self.prompt = prompt
        self.created = int(time.time())
        self._first = True

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _usage(self, out: Output) -> dict:
        n = len(out.tokens)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n,
                "total_tokens": len(self.prompt) + n}

    def whole(self, out: Output, reason: str | None) -> dict:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        if self.token_ids:
            choice["prompt_token_ids"], choice["token_ids"] = self.prompt, out.tokens
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [choice], "usage": self._usage(out)}

    def chunk(self, text: str = "", tokens=(), reason: str | None = None,
              role: bool = False) -> dict:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if role
                               else {"content": text} if text else {})
        else:
            choice["text"] = text
        if self.token_ids and not role:
            if self._first:
                choice["prompt_token_ids"], self._first = self.prompt, False
            choice["token_ids"] = list(tokens)
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [choice]}

    def usage_chunk(self, out: Output) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [], "usage": self._usage(out)}
