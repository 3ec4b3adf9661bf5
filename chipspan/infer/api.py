"""``chipspan api``: the engine behind OpenAI's chat completions API, on uvicorn.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (plain, or ``stream`` as server-sent
events). Set from the environment as LLaMA-Factory's api reads it: ``API_HOST`` (0.0.0.0),
``API_PORT`` (8000), ``API_KEY`` (when set, every request needs ``Authorization: Bearer KEY``) and
``API_MODEL_NAME`` (the model id clients name; default the model folder's name).

Requests are answered one at a time, in the order they came, by one worker thread that owns the
chips; at most ``API_QUEUE`` (64) wait. A bad request gets a 4xx answer with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``, and nothing a request holds can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chipspan.errors import ChipspanError
from chipspan.infer.engine import Completion, Engine

MAX_BODY_BYTES = 4 << 20  # a request body beyond this is refused (413)
MAX_STOP_STRINGS = 4  # as OpenAI allows
ROLES = {"user": "user", "assistant": "assistant", "tool": "observation"}  # OpenAI role -> template role


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    key: str | None = None
    model_name: str | None = None  # None: the engine's name
    queue: int = 64

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ServerSettings:
        """The settings in ``API_HOST``, ``API_PORT``, ``API_KEY``, ``API_MODEL_NAME``, ``API_QUEUE``."""
        port = _whole_number(environ, "API_PORT", "8000", 0, 65535)
        queue = _whole_number(environ, "API_QUEUE", "64", 1, 100_000)
        return cls(
            host=environ.get("API_HOST", "0.0.0.0") or "0.0.0.0",
            port=port,
            key=environ.get("API_KEY") or None,
            model_name=environ.get("API_MODEL_NAME") or None,
            queue=queue,
        )


def _whole_number(environ: Mapping[str, str], name: str, default: str, low: int, high: int) -> int:
    text = environ.get(name, default).strip()
    if not text.isdigit() or not low <= int(text) <= high:
        raise ChipspanError(f"{name}={text!r}: must be a whole number in [{low}, {high}]")
    return int(text)


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request, checked: the turns as the template takes them and the sampling."""

    turns: list[tuple[str, str]]
    system: str | None
    changes: dict  # SamplingSettings fields the request sets
    stop: list[str]
    stream: bool
    include_usage: bool
    tools: str = ""  # the tools' function schemas as JSON text ("" for none)


def parse_chat_request(body: object, model_name: str, engine: Engine) -> ChatRequest:
    """Check an OpenAI chat completion body; :class:`RequestError` names the first thing wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "'model' is required: the id /v1/models lists", "model")
    if model != model_name:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model")
    system, turns = _turns(body.get("messages"))
    tools = _tools(body.get("tools"), body.get("tool_choice"))
    for name in ("functions", "response_format", "logprobs"):
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise RequestError(400, f"'{name}' is not supported by chipspan api", name)
    if _number(body, "n", 1, 1, 1, whole=True) != 1:
        raise RequestError(400, "'n' must be 1: one answer per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise RequestError(400, f"'{name}' is not supported; use 'repetition_penalty' (transformers')", name)
    changes = _sampling(body, engine)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    return ChatRequest(turns, system, changes, stop, stream, bool(options.get("include_usage")), tools)


def _tools(tools: object, choice: object) -> str:
    """The function schemas of OpenAI's ``tools`` as the JSON text templates list; "" for none.
    The model decides whether to call (``tool_choice`` "auto"); "none" sends no tools."""
    if tools in (None, []) or choice == "none":
        return ""
    if choice not in (None, "auto"):
        raise RequestError(
            400, '\'tool_choice\' may be "auto" or "none": the model decides whether to call', "tool_choice"
        )
    if not isinstance(tools, list) or not all(
        isinstance(t, dict)
        and t.get("type", "function") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise RequestError(400, '\'tools\' must be a list of {"type": "function", "function": {"name", ...}}', "tools")
    return json.dumps([t["function"] for t in tools], ensure_ascii=False)


def _turns(messages: object) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt or None, [(role, text)]) from OpenAI's ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    system, turns = None, []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            turns.append(("function", _calls_content(message["tool_calls"], where)))
            continue
        text = _text(message.get("content"), where)
        if role in ("system", "developer"):
            if i != 0:
                raise RequestError(400, f"{where}: a system message must come first", where)
            system = text
        elif role in ROLES:
            turns.append((ROLES[role], text))
        else:
            raise RequestError(400, f"{where}: unknown role {str(role)[:40]!r} (system, user, assistant, tool)", where)
    return system, turns


def _calls_content(tool_calls: object, where: str) -> str:
    """An assistant's ``tool_calls`` as a function message's content: the JSON list of
    ``{"name", "arguments"}``, the arguments read from their JSON text (as the datasets hold them)."""
    calls = []
    for call in tool_calls if isinstance(tool_calls, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        try:
            calls.append({"name": function["name"], "arguments": json.loads(function.get("arguments") or "{}")})
        except (TypeError, KeyError, ValueError, RecursionError):
            raise RequestError(
                400, f"{where}.tool_calls: each needs a function with a name and JSON arguments", f"{where}.tool_calls"
            ) from None
    return json.dumps(calls, ensure_ascii=False)


def _text(content: object, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where}.content must be text (a string or a list of text parts)", f"{where}.content")


def _sampling(body: dict, engine: Engine) -> dict:
    """The SamplingSettings fields the request sets. Temperature 0 (or do_sample false) is greedy."""
    changes = {}
    limit = _number(body, "max_completion_tokens", None, 1, engine.context, whole=True)
    limit = _number(body, "max_tokens", limit, 1, engine.context, whole=True)
    if limit is not None:
        changes["max_new_tokens"] = limit
    temperature = _number(body, "temperature", None, 0.0, 2.0)
    if temperature is not None:
        changes["temperature"] = temperature
    if body.get("do_sample") is False:  # LLaMA-Factory's api takes it too
        changes["temperature"] = 0.0
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise RequestError(400, "'top_p' must be above 0", "top_p")
        changes["top_p"] = top_p
    top_k = _number(body, "top_k", None, 0, 1 << 31, whole=True)
    if top_k is not None:
        changes["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", None, 0.0, 100.0)
    if penalty is not None:
        if penalty == 0:
            raise RequestError(400, "'repetition_penalty' must be above 0", "repetition_penalty")
        changes["repetition_penalty"] = penalty
    seed = _number(body, "seed", None, 0, 2**32 - 1, whole=True)
    if seed is not None:
        changes["seed"] = seed
    return changes


def _number(body: dict, name: str, default, low, high, whole: bool = False):
    """``body[name]`` checked to be a number in [low, high] (a whole one if ``whole``); default if absent."""
    value = body.get(name)
    if value is None:
        return default
    kind_ok = isinstance(value, int) if whole else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        raise RequestError(400, f"'{name}' must be {kind} in [{low}, {high}]", name)
    return value


class Server:
    """The ASGI app: routes, key check, the queue onto the engine's one worker thread."""

    def __init__(self, engine: Engine, settings: ServerSettings, system: str | None = None):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.engine, self.settings, self.system = engine, settings, system
        self.model_name = settings.model_name or engine.name
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chipspan-engine")
        self.waiting = 0  # requests queued or running
        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        handlers = {RequestError: self._refused, Exception: self._failed, 404: self._not_found, 405: self._not_allowed}
        self.app = Starlette(routes=routes, exception_handlers=handlers)
        self.created = int(time.time())

    async def models(self, request):
        self._check_key(request)
        return _json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        self._check_key(request)
        if request.path_params["model_id"] != self.model_name:
            raise RequestError(
                404, f"the model '{request.path_params['model_id']}' does not exist", code="model_not_found"
            )
        return _json_response(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "chipspan"}

    async def chat_completions(self, request):
        self._check_key(request)
        chat = parse_chat_request(await _read_json(request), self.model_name, self.engine)
        if self.waiting >= self.settings.queue:
            raise RequestError(429, f"{self.waiting} requests are waiting; try again later")
        return await (self._streamed(chat) if chat.stream else self._answered(chat))

    async def _answered(self, chat: ChatRequest):
        completion = await self._run(chat, on_text=None)
        if isinstance(completion, RequestError):
            return _error_response(completion)
        message, finish_reason = self._message(chat, completion)
        choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}
        return _json_response({**self._envelope("chat.completion"), "choices": [choice], "usage": _usage(completion)})

    def _message(self, chat: ChatRequest, completion: Completion) -> tuple[dict, str]:
        """The answer as an OpenAI message body and its finish reason: the function calls it makes
        when the request offered tools, else its text."""
        calls = self.engine.function_calls(completion.text) if chat.tools else None
        if not calls:
            return {"content": completion.text}, completion.finish_reason
        tool_calls = [
            {"id": f"call_{uuid.uuid4().hex}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls
        ]
        return {"content": None, "tool_calls": tool_calls}, "tool_calls"

    async def _streamed(self, chat: ChatRequest):
        from starlette.responses import StreamingResponse

        loop, pieces, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def on_text(piece: str) -> None:
            if cancelled.is_set():
                raise _ClientGone
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        # with tools an answer may be a call, known only once it is complete: it comes in one piece
        task = asyncio.ensure_future(self._run(chat, None if chat.tools else on_text))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        envelope = self._envelope("chat.completion.chunk")

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return _event({**envelope, "choices": [choice]})

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await pieces.get()) is not None:
                    yield chunk({"content": piece})
                completion = task.result()
                if isinstance(completion, RequestError):  # e.g. a prompt longer than the context
                    yield _event(_error_body(completion))
                else:
                    finish_reason = completion.finish_reason
                    if chat.tools:
                        message, finish_reason = self._message(chat, completion)
                        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls", []))]
                        yield chunk({"tool_calls": calls} if calls else {"content": completion.text})
                    yield chunk({}, finish_reason)
                    if chat.include_usage:
                        yield _event({**envelope, "choices": [], "usage": _usage(completion)})
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # a client gone mid-answer frees the chips at the next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _run(self, chat: ChatRequest, on_text) -> Completion | RequestError:
        """The answer, generated on the worker thread after the requests before it."""
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, self._generate, chat, on_text)
        finally:
            self.waiting -= 1

    def _generate(self, chat: ChatRequest, on_text) -> Completion | RequestError:
        settings = self.engine.with_settings(**chat.changes)
        try:
            return self.engine.generate(
                chat.turns,
                chat.system or self.system,
                settings,
                chat.stop,
                on_text,
                within_context=True,
                tools=chat.tools,
            )
        except ChipspanError as exc:  # the conversation itself is wrong (roles, length)
            return RequestError(400, str(exc), "messages")
        except _ClientGone:
            return RequestError(499, "the client closed the connection")

    def _envelope(self, kind: str) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
        }

    def _check_key(self, request) -> None:
        if self.settings.key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.settings.key.encode()):
            raise RequestError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    async def _refused(self, request, exc: RequestError):
        return _error_response(exc)

    async def _failed(self, request, exc: Exception):
        """A failure of ours: 500 with an error body; the server goes on."""
        print(f"chipspan api: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return _error_response(RequestError(500, "the server failed on this request"))

    async def _not_found(self, request, exc):
        return _error_response(RequestError(404, f"no endpoint {request.method} {request.url.path}"))

    async def _not_allowed(self, request, exc):
        return _error_response(RequestError(405, f"{request.method} is not allowed on {request.url.path}"))


class _ClientGone(Exception):
    """Raised from the text callback to end a generation whose client is gone."""


async def _read_json(request) -> object:
    """The body as JSON, at most MAX_BODY_BYTES read."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"the request body is not valid JSON ({str(exc)[:80]})") from None


def _usage(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _error_body(exc: RequestError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}


def _error_response(exc: RequestError):
    return _json_response(_error_body(exc), exc.status)


def _json_response(content: dict, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(content, ensure_ascii=False), status, media_type="application/json")


def _event(content: dict) -> str:
    return f"data: {json.dumps(content, ensure_ascii=False)}\n\n"


def serve(engine: Engine, settings: ServerSettings, system: str | None = None) -> None:
    """Serve until interrupted."""
    import uvicorn

    server = Server(engine, settings, system)
    where = f"http://{settings.host}:{settings.port}/v1"
    guard = "a key is required" if settings.key else "no API_KEY: anyone who can reach the port can use it"
    print(f"chipspan api: serving '{server.model_name}' on {where} ({guard})", file=sys.stderr, flush=True)
    uvicorn.run(server.app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
