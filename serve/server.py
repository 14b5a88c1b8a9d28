"""`mistral-trt serve EXPORT_DIR`: bind, load the model in the background (GET /health says 503 until it is
ready), serve with uvicorn until SIGTERM or Ctrl-C.

    mistral-trt serve build/onnx/smollm2-135m-instruct-fused-fp32 --port 8000 --max-batch 8

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections, the scheduler stops admitting, running
streams get up to --shutdown-timeout seconds to finish (then they end with an error event), and the process
exits 0: a requested stop is not a failure.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import threading
from pathlib import Path

from mistral_trt.runtime.errors import UserError

from .api import ServerState, create_app


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(state: ServerState, export_dir: str, provider: str, max_batch: int, max_queue: int,
         max_context: int | None, prefill_chunk: int, itl_slack: float = 2.5, on_failure=lambda: None,
         speculate=None) -> None:
    """Runs in a thread while the server already answers /health with 503. A model that cannot load stops
    the server (`on_failure`): the command then exits 2 with the reason."""
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.tokenizer import Tokenizer

    from .metrics import Metrics
    from .scheduler import Scheduler

    try:
        backend = open_backend(export_dir, provider)
        tok = Tokenizer.for_export(export_dir, backend.manifest)
        metrics = Metrics(state.model_name, max_batch)
        sched = Scheduler(backend, tok, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                          prefill_chunk=prefill_chunk, itl_slack=itl_slack, metrics=metrics, speculate=speculate)
        sched.start()
    except UserError as e:
        state.load_error = str(e)
        on_failure()
        return
    state.manifest, state.tokenizer, state.metrics, state.max_context = backend.manifest, tok, metrics, sched.max_context
    state.scheduler = sched
    if speculate is not None:
        from mistral_trt.runtime.speculative import exactness_note

        if exactness_note(backend.manifest):
            log(exactness_note(backend.manifest))
    log(f"model ready: {state.model_name} ({backend.manifest.graph} graph, {type(backend).__name__}, "
        f"{max_batch} slots of {sched.max_context} positions, "
        f"{'continuous batching' if backend.ragged else 'static batches'})")


def serve(export_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, model_name: str | None = None, safe_prompt: bool = False,
          max_context: int | None = None, prefill_chunk: int = 512, itl_slack: float = 2.5, provider: str = "cpu",
          shutdown_timeout: float = 30.0, speculate=None, max_body_bytes: int | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve needs starlette and uvicorn: pip install 'mistral-trt[serve]'") from None
    from mistral_trt.runtime.manifest import Manifest

    Manifest.load(export_dir)  # a bad folder fails now, before binding a port
    state = ServerState(model_name=model_name or Path(export_dir).resolve().name, api_key=api_key,
                        safe_prompt=safe_prompt)
    if max_body_bytes is not None:
        state.max_body_bytes = max_body_bytes
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there: {e.strerror}") from None
    bound = sock.getsockname()[1]

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.scheduler is not None:  # stop admitting; running streams go on until the timeout
                state.scheduler.begin_shutdown()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # uvicorn would re-raise SIGTERM after the graceful exit: exit 0

    config = uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="off")
    server = Server(config)

    def failed():
        server.should_exit = True

    threading.Thread(target=load, name="model-loader", daemon=True, args=(
        state, export_dir, provider, max_batch, max_queue, max_context, prefill_chunk, itl_slack, failed,
        speculate)).start()
    log(f"mistral-trt serve: listening on http://{host}:{bound} (model {state.model_name}); loading {export_dir} ...")
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop(timeout=0)
    if state.load_error:
        raise UserError(state.load_error)
    log("mistral-trt serve: stopped")
