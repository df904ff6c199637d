"""`picogpt serve`'s HTTP side: Starlette on uvicorn (an ordinary ASGI stack: routing, streaming
responses for server-sent events, graceful shutdown; nothing here parses HTTP). The handlers only
parse and check a request (protocol.py), reserve room and submit it to the engine thread
(worker.py), and send back what comes, so admission, decoding, sampling and cancellation live in the
engine, once.
"""

import asyncio
import errno
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import budget
from .. import tokenizer as tok
from ..log import warn
from ..options import SERVE
from .protocol import BadRequest, Choice, options_of, prompts_of, requests_of
from .worker import Busy, Error, Job, Metrics, Worker

MAX_BODY = 1 << 20  # bytes of a request body: 413 beyond (a full context of token ids is under 10 kB)
PAGE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "page"
)  # the page at /, its HTML, CSS and JS (docs/page.md)


def error(status, message, kind="invalid_request_error", param=None, code=None, headers=None):
    """OpenAI's error body."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers=headers
    )


async def body_of(request):
    """The request's JSON; BadRequest for bad JSON, 413 for a body over MAX_BODY."""
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > MAX_BODY:  # uvicorn refuses a malformed one before this
        raise BadRequest(f"the request body is over {MAX_BODY} bytes", status=413)
    data = b""
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY:
            raise BadRequest(f"the request body is over {MAX_BODY} bytes", status=413)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the request body nests JSON too deeply") from None


def handled(endpoint, needs_model=True, logged=True):
    """An endpoint that answers BadRequest with OpenAI's error body, and any other failure with a 500
    and a one-line message (the traceback goes to the server's log, never to the client)."""

    async def run(request):
        state = request.app.state
        start = time.perf_counter()
        try:
            if needs_model and state.worker is None:
                response = error(
                    503,
                    "the model is still loading: retry in a few seconds"
                    if not state.stopping
                    else "the server is shutting down",
                    "server_error",
                    headers={"Retry-After": "5"},
                )
            elif state.stopping and request.method == "POST":
                response = error(503, "the server is shutting down", "server_error")
            else:
                response = await endpoint(request)
        except BadRequest as e:
            response = error(
                e.status, str(e), "invalid_request_error" if e.status != 404 else "not_found_error", e.param, e.code
            )
        except Busy:
            response = error(
                429,
                "the server is busy: every row of the batch and the queue are taken; retry shortly",
                "rate_limit_error",
                headers={"Retry-After": "1"},
            )
        except ClientGone:  # nginx's 499: nobody to answer; the log and /metrics say so
            response = error(499, "the client closed the connection before the answer", "client_closed_request")
            request.state.tokens = ", the client left: cancelled"
        except Exception as e:
            warn(f"internal error on {request.method} {request.url.path}: {type(e).__name__}: {e}")
            traceback.print_exc()
            response = error(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        state.metrics.requests.labels(str(response.status_code)).inc()
        if logged and not isinstance(response, StreamingResponse):  # a stream is logged when it ends (sse)
            tokens = getattr(request.state, "tokens", "")
            warn(
                f"{request.method} {request.url.path} {response.status_code}{tokens} in {time.perf_counter() - start:.2f} s"
            )
        return response

    return run


async def health(request):
    ready = request.app.state.worker is not None and not request.app.state.stopping
    return JSONResponse({"status": "ok" if ready else "loading"}, 200 if ready else 503)


async def models(request):
    state = request.app.state
    entry = {
        "id": state.name,
        "object": "model",
        "created": state.created,
        "owned_by": "picogpt",
        "max_model_len": state.n_ctx,
    }
    return JSONResponse({"object": "list", "data": [entry]})


async def tokenize(request):
    body = await body_of(request)
    text = body.get("prompt", body.get("content")) if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise BadRequest("'prompt' must be a string", "prompt")
    tokens = tok.encode(request.app.state.tokenizer, text)
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": request.app.state.n_ctx})


async def detokenize(request):
    body = await body_of(request)
    state = request.app.state
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not (
        isinstance(tokens, list)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < state.n_vocab for t in tokens)
    ):
        raise BadRequest(f"'tokens' must be a list of token ids from 0 to {state.n_vocab - 1}", "tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(tokens)})


async def chat(request):
    raise BadRequest(
        "GPT-2 has no chat template: use /v1/completions with a plain-text prompt",
        status=400,
        code="unsupported_endpoint",
    )


async def page(request):
    return FileResponse(os.path.join(PAGE, "index.html"))


async def prometheus(request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def completions(request):
    state = request.app.state
    arrived = time.perf_counter()
    body = await body_of(request)
    o = options_of(body, state.n_vocab, state.name)
    prompts = prompts_of(body, state.tokenizer, state.n_vocab, state.n_ctx)
    n_seq = len(prompts) * o.n
    worker = state.worker
    if n_seq > worker.capacity:
        raise BadRequest(
            f"{n_seq} sequences (prompts x n) is more than this server takes at once ({worker.capacity}: --parallel + --queue)",
            "n",
        )
    job = Job(asyncio.get_running_loop(), arrived, requests_of(prompts, o))
    choices = [  # the response's, shaped here from what the engine sends
        Choice(state.tokenizer, i, o, text) for i, (_, text) in enumerate(p for p in prompts for _ in range(o.n))
    ]
    with worker.reserve(n_seq) as reservation:  # given back if anything below fails
        worker.submit(job, reservation)
    n_prompt = sum(len(ids) for ids, _ in prompts)
    state.metrics.prompt_tokens.inc(n_prompt)
    reply = dict(
        id=f"cmpl-{uuid.uuid4().hex[:24]}", object="text_completion", created=int(time.time()), model=state.name
    )
    usage = lambda tokens: {"prompt_tokens": n_prompt, "completion_tokens": tokens, "total_tokens": n_prompt + tokens}  # noqa: E731
    if o.stream:  # Starlette cancels the stream when the client leaves
        return StreamingResponse(sse(request, job, choices, reply, o, usage), media_type="text/event-stream")
    out = {c.index: {"text": "", "logprobs": None} for c in choices}

    async def collect():
        async for piece in events_of(request, job):
            taken = choices[piece.index].take(piece)
            if taken is not None:
                text, logprobs, _ = taken
                out[piece.index]["text"] += text
                out[piece.index]["logprobs"] = merged(out[piece.index]["logprobs"], logprobs)

    await until_done_or_gone(request, collect())
    state.metrics.latency.observe(time.perf_counter() - arrived)
    shaped = [
        {
            "text": out[c.index]["text"],
            "index": c.index,
            "logprobs": out[c.index]["logprobs"],
            "finish_reason": c.finish,
        }
        for c in choices
    ]
    n_new = sum(c.tokens for c in choices)
    request.state.tokens = f", {n_prompt} prompt + {n_new} new tokens"
    return JSONResponse(reply | {"choices": shaped, "usage": usage(n_new)})


def merged(a, b):
    """Two pieces of a choice's legacy logprobs object as one (None: none asked)."""
    return b if a is None else {k: a[k] + b[k] for k in a}


class Failure(Exception):
    """The engine failed a job's step: a 500."""


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer: the request is cancelled."""


async def until_done_or_gone(request, work):
    """Run `work` (a coroutine reading the job's events) to its end, unless the client disconnects
    first: then cancel it (events_of then cancels the job in the engine) and raise ClientGone.
    The body is read by now, so the next ASGI message is the disconnect, the moment it happens."""

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    working, watching = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            task.cancel()
        await asyncio.gather(working, watching, return_exceptions=True)
    if working not in done:
        raise ClientGone()
    working.result()  # a Failure from the engine is raised here


async def events_of(request, job):
    """The job's Pieces until every choice has ended; if the reading ends first (the client left, the
    stream or the handler was cancelled), the job is cancelled in the engine and its rows go back."""
    pending = set(range(len(job.requests)))
    try:
        while pending:
            event = await job.events.get()
            if isinstance(event, Error):
                raise Failure(event.message)
            if event.finish:
                pending.discard(event.index)
            yield event
    finally:
        if pending:
            request.app.state.worker.cancel(job)


async def sse(request, job, choices, reply, o, usage):
    """Server-sent events: a completion chunk per new piece of text, then [DONE]."""
    chunk = lambda choices, **more: f"data: {json.dumps(reply | {'choices': choices} | more)}\n\n"  # noqa: E731
    extra = {"usage": None} if o.include_usage else {}
    try:
        async for piece in events_of(request, job):
            taken = choices[piece.index].take(piece)
            if taken is None:
                continue
            text, logprobs, finish = taken
            if text or (logprobs and logprobs["tokens"]) or finish:
                yield chunk(
                    [{"text": text, "index": piece.index, "logprobs": logprobs, "finish_reason": finish}], **extra
                )
        if extra:
            yield chunk([], usage=usage(sum(c.tokens for c in choices)))
    except Failure as e:
        yield f"data: {json.dumps({'error': {'message': f'internal error: {e}', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    finally:  # also when the client leaves: Starlette cancels the stream, and the request is logged all the same
        seconds = time.perf_counter() - job.arrived
        request.app.state.metrics.latency.observe(seconds)
        left = "" if all(c.finish for c in choices) else ", the client left"
        warn(
            f"POST /v1/completions 200 (stream{left}), {usage(0)['prompt_tokens']} prompt + {sum(c.tokens for c in choices)} new tokens sent in {seconds:.2f} s"
        )
    yield "data: [DONE]\n\n"


async def not_found(request, exc):
    status = getattr(exc, "status_code", 404)
    message = f"no route {request.method} {request.url.path}: see / (the page), /v1/completions, /v1/models, /health, /tokenize, /detokenize, /metrics"
    if status == 405:
        message = f"{request.url.path} does not take {request.method}"
    request.app.state.metrics.requests.labels(str(status)).inc()
    return error(status, message, "not_found_error" if status == 404 else "invalid_request_error")


def app(name, metrics=None):
    """The Starlette app; its state.worker is set once the model is loaded (503 until then)."""
    routes = [
        Route("/v1/completions", handled(completions), methods=["POST"]),
        Route("/v1/chat/completions", handled(chat), methods=["POST"]),
        Route("/v1/models", handled(models), methods=["GET"]),
        Route("/health", handled(health, needs_model=False, logged=False), methods=["GET"]),
        Route("/tokenize", handled(tokenize), methods=["POST"]),
        Route("/detokenize", handled(detokenize), methods=["POST"]),
        Route("/metrics", handled(prometheus, logged=False), methods=["GET"]),
        Route("/", handled(page, needs_model=False, logged=False), methods=["GET"]),  # served while the model loads too
        Mount("/page", StaticFiles(directory=PAGE)),
    ]
    web = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, HTTPException: not_found})
    web.state.name, web.state.metrics, web.state.worker, web.state.stopping, web.state.created = (
        name,
        metrics or Metrics(),
        None,
        False,
        int(time.time()),
    )
    return web


def ready(web, model, parallel, queue_size, chunk, prefix_cache=True, cache_mb=0):
    """Start the engine thread: from here on the server answers completions."""
    state = web.state
    state.tokenizer, state.n_vocab, state.n_ctx = model.tokenizer, model.tokenizer.n_vocab, model.config["n_positions"]
    worker = Worker(model, parallel, queue_size, chunk, state.metrics, prefix_cache, cache_mb)
    worker.thread.start()
    state.worker = worker
    return worker


def serve(
    name,
    dtype=None,
    revision=None,
    host=SERVE["host"],
    port=SERVE["port"],
    parallel=SERVE["parallel"],
    queue_size=SERVE["queue"],
    chunk=SERVE["chunk"],
    kv_dtype="float32",
    prefix_cache=SERVE["prefix_cache"],
    cache_mb=SERVE["cache_mb"],
):
    """Run the server until Ctrl-C or SIGTERM: listen at once (/health says 503 while the model loads),
    load and warm up the model, then take requests. Running requests end with what they have.
    kv_dtype: the KV cache's, "float32" or "float16" (half the memory per row of the batch).
    prefix_cache: keep retired requests' keys and values for later prompts that begin the same way,
    in the batch's free rows and cache_mb megabytes of rows beyond them."""
    import uvicorn

    from .. import warmup
    from ..api import load

    web, failed, unbound = app(name), [], []

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            """Bind the port, then say so and start loading: a port that cannot be bound is told
            alone, never after a line that claims it listens (uvicorn exits, the bind's OSError as
            its context)."""
            try:
                await super().startup(sockets)
            except SystemExit as e:
                unbound.append(e.__context__)
                raise
            warn(f"loading {name}; listening on http://{host}:{port} (/health answers 503 until the model is ready)")
            threading.Thread(target=loading, name="picogpt-load", daemon=True).start()

        def handle_exit(self, sig, frame):  # stop the engine first: running streams end and close
            web.state.stopping = True
            if web.state.worker is not None:
                web.state.worker.stop()
            super().handle_exit(sig, frame)

    # asyncio warns "socket.send() raised exception." for each write to a client that has gone, until
    # Starlette notices and cancels the stream: the stream's own log line already says the client left.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    # uvicorn's own log stays quiet: the handlers report every error themselves, one line each, and a
    # port that cannot be bound is told below.
    config = uvicorn.Config(
        web, host=host, port=port, log_level="critical", access_log=False, lifespan="off", timeout_graceful_shutdown=10
    )
    server = Server(config)

    def loading():
        try:
            model = load(name, dtype=dtype, revision=revision, kv_dtype=kv_dtype)
            eot, n_ctx = model.tokenizer.eot_token, model.config["n_positions"]
            # the kernels, compiled once: the most prompt tokens a step takes (without a cap, a whole
            # prompt while nothing decodes; 3 short of the context, which serve never slides) beside
            # a one-token prompt, then decoding
            longest = min(chunk or budget.IDLE, n_ctx - 3)
            warmup.warm_up(model, [[eot] * longest, [eot]], 3, say=warn)
            if not web.state.stopping:
                ready(web, model, parallel, queue_size, chunk, prefix_cache, cache_mb)
                warn(
                    f"serving {name} ({model.dtype}{'' if kv_dtype == 'float32' else f', {kv_dtype} KV cache'}, up to {parallel} sequence{'s' if parallel != 1 else ''} at once) at http://{host}:{port}/v1 ; Ctrl-C stops"
                )
        except BaseException as e:  # noqa: BLE001 - reported by the CLI after the server stops
            failed.append(e)
            server.should_exit = True

    try:
        server.run()  # binds, then startup above starts loading
    except SystemExit:  # uvicorn exits when it cannot bind
        server.started = False
    if failed:
        raise failed[0]
    if not server.started:
        raise OSError(cannot_listen(host, port, unbound[0] if unbound else None))


def cannot_listen(host, port, error):
    """The one line for a port uvicorn could not bind, from the bind's OSError (None: unknown)."""
    where = f"could not listen on {host}:{port}"
    code = getattr(error, "errno", None)
    if code == errno.EADDRINUSE:
        return f"{where}: the port is in use (by another server, or another picogpt serve): pick another --port"
    if code == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges): pick another --port"
    if code == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return f"{where}: {host} is not an address of this machine: pick another --host (127.0.0.1, or 0.0.0.0 for every interface)"
    why = (getattr(error, "strerror", None) or str(error)) if error is not None else "in use, or not an address here"
    return f"{where} ({why}): pick another --port or --host"
