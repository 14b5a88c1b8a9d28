"""`mistral-trt serve EXPORT_DIR`: bind, load the model in the background (GET /health says 503 until it is
ready), serve with uvicorn until SIGTERM or Ctrl-C.

    mistral-trt serve build/onnx/smollm2-135m-instruct-fused-fp32 --port 8000 --max-batch 8

The drain (SIGTERM or SIGINT): the listener stays open so that /health can say "draining" (503) to the load
balancer, and new completion requests get a 503 with Retry-After; requests already taken, waiting or running, go on
until they finish or --shutdown-timeout passes. At that deadline every one still open ends with an error (a stream:
an error event, then [DONE]; a non-streamed request: a 503). Then uvicorn closes the connections and the process
exits 0: a requested stop is not a failure. A second signal moves the deadline to now.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
import threading
from pathlib import Path

from mistral_trt.runtime.errors import UserError

from .api import ServerState, create_app
from .limits import Limits, protocol


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(state: ServerState, export_dir: str, provider: str, max_batch: int, max_queue: int,
         max_context: int | None, prefill_chunk: int, itl_slack: float = 2.5, on_failure=lambda: None,
         speculate=None, prefix_cache: bool = True, prefix_cache_mib: float | None = None) -> None:
    """Runs in a thread while the server already answers /health with 503. A model that cannot load stops
    the server (`on_failure`): the command then exits 2 with the reason."""
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.tokenizer import Tokenizer

    from .scheduler import Scheduler

    try:
        backend = open_backend(export_dir, provider)
        tok = Tokenizer.for_export(export_dir, backend.manifest)
        sched = Scheduler(backend, tok, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                          prefill_chunk=prefill_chunk, itl_slack=itl_slack, metrics=state.metrics, speculate=speculate,
                          prefix_cache=prefix_cache, prefix_cache_mib=prefix_cache_mib)
        sched.start()
        from mistral_trt.runtime.structured import ll_tokenizer

        ll_tokenizer(tok, tuple(backend.manifest.eos_token_id))  # structured outputs' vocabulary, once (~0.5 s)
    except UserError as e:
        state.load_error = str(e)
        on_failure()
        return
    state.manifest, state.tokenizer, state.max_context = backend.manifest, tok, sched.max_context
    state.scheduler = sched
    if speculate is not None:
        from mistral_trt.runtime.speculative import exactness_note

        if exactness_note(backend.manifest):
            log(exactness_note(backend.manifest))
    log(f"model ready: {state.model_name} ({backend.manifest.graph} graph, {type(backend).__name__}, "
        f"{max_batch} slots of {sched.max_context} positions, "
        f"{'continuous batching' if backend.ragged else 'static batches'}"
        f"{', prefix cache' if prefix_cache and backend.ragged else ''}"
        f"{f' + {sched.prefix_cache_bytes / 2**20:.0f} MiB for prefixes whose slot was taken' if sched.prefix_cache_bytes else ''})")


def tls_context(certfile: str | None, keyfile: str | None) -> None:
    """Load the certificate now, so a bad file is one line before the port is bound (uvicorn loads it again)."""
    if keyfile and not certfile:
        raise UserError("--ssl-keyfile needs --ssl-certfile")
    if not certfile:
        return
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        raise UserError(f"--ssl-certfile {certfile}{f' --ssl-keyfile {keyfile}' if keyfile else ''}: not a PEM "
                        f"certificate and its private key ({getattr(e, 'reason', None) or e})") from None


async def drain(server, state: ServerState, timeout: float, forced: asyncio.Event) -> None:
    """Stop taking work, let what was taken finish until the deadline (or a second signal), end the rest with an
    error, then let uvicorn close. Runs on the event loop: the open requests' state is only touched there."""
    state.draining = True
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_until(lambda: state.idle, forced), timeout)
    state.abort()
    with contextlib.suppress(asyncio.TimeoutError):  # the error events and 503s go out
        await asyncio.wait_for(_until(lambda: state.idle), 5.0)
    server.should_exit = True


async def _until(done, forced: asyncio.Event | None = None) -> None:
    while not done() and not (forced and forced.is_set()):
        await asyncio.sleep(0.02)


def serve(export_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          keys: tuple[bytes, ...] = (), protect_metrics: bool = False, allowed_origins: tuple[str, ...] = (),
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, model_name: str | None = None,
          safe_prompt: bool = False, max_context: int | None = None, prefill_chunk: int = 512, itl_slack: float = 2.5,
          provider: str = "cpu", shutdown_timeout: float = 30.0, speculate=None, limits: Limits = Limits(),
          log_prompts: bool = False, prefix_cache: bool = True, prefix_cache_mib: float | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve needs starlette and uvicorn: pip install 'mistral-trt[serve]'") from None
    from mistral_trt.runtime.manifest import Manifest

    from .metrics import Metrics

    Manifest.load(export_dir)  # a bad folder fails now, before binding a port
    if protect_metrics and not keys:
        raise UserError("--protect-metrics needs an API key (--api-key, --api-key-file or $MISTRAL_TRT_API_KEY)")
    tls_context(ssl_certfile, ssl_keyfile)
    name = model_name or Path(export_dir).resolve().name
    state = ServerState(model_name=name, keys=keys, protect_metrics=protect_metrics,
                        allowed_origins=tuple(allowed_origins), log_prompts=log_prompts, safe_prompt=safe_prompt,
                        limits=limits, metrics=Metrics(name, max_batch))
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except (OSError, OverflowError) as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there: {getattr(e, 'strerror', None) or e}") from None
    bound = sock.getsockname()[1]
    forced = asyncio.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the signal handler, on the event loop's thread
            if self.drain_loop is None:
                return super().handle_exit(sig, frame)
            if state.draining:
                self.drain_loop.call_soon_threadsafe(forced.set)
            else:
                state.draining = True
                self.drain_loop.call_soon_threadsafe(lambda: self.drain_loop.create_task(
                    drain(self, state, shutdown_timeout, forced)))

        async def startup(self, sockets=None):
            self.drain_loop = asyncio.get_running_loop()
            await super().startup(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # uvicorn would re-raise SIGTERM after the graceful exit: exit 0

    config = uvicorn.Config(create_app(state), http=protocol(limits, state.metrics.connections_refused.inc),
                            log_level="warning", timeout_graceful_shutdown=5, lifespan="off",
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    server = Server(config)
    server.drain_loop = None

    def failed():
        server.should_exit = True

    threading.Thread(target=load, name="model-loader", daemon=True, args=(
        state, export_dir, provider, max_batch, max_queue, max_context, prefill_chunk, itl_slack, failed,
        speculate, prefix_cache, prefix_cache_mib)).start()
    scheme = "https" if ssl_certfile else "http"
    log(f"mistral-trt serve: listening on {scheme}://{host}:{bound} (model {state.model_name}); loading {export_dir} ...")
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop(timeout=0)
    if state.load_error:
        raise UserError(state.load_error)
    log("mistral-trt serve: stopped")
