"""How long the path of a token and of a request is: the stays in our modules, counted by a profiler.

    python scripts/walk.py EXPORT_DIR            # a fused export; prints a table and writes nothing

A *stay* is a maximal run of Python frames of one of our modules (mistral_trt.*); calls into numpy, onnxruntime
or the standard library do not end a stay. A *return* is a stay in a module the walk already visited. Two walks:

- token: one decode token of `mistral-trt generate --speculate off`: the stays from one decode step's entry into
  runtime/ort.py to the next one's (the per-token loop: the backend, up to the CLI, back down);
- request: one non-streaming /v1/completions request with max_tokens 1 through the ASGI app and the scheduler's
  worker thread, in process (both threads' stays, counted per thread and added).

The same script runs against any checkout (PYTHONPATH=DIR_WITH_mistral_trt), so a before/after is one command.
"""
from __future__ import annotations

import contextlib
import io
import sys
import threading

OURS = ("mistral_trt.",)


def _module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith(OURS) else None


class Tracer:
    """Per thread: the sequence of our modules that Python frames ran in, collapsed into stays."""

    def __init__(self, active: bool = True):
        self.stays: dict[int, list[str]] = {}
        self.steps: list[int] = []  # where in the main thread's stays each backend step began
        self.active = active  # installed early (threads inherit it when they start), counting only when active

    def __call__(self, frame, event, arg):
        if not self.active:
            return
        if event == "call":
            mod = _module(frame)
        elif event == "return" and frame.f_back is not None:
            mod = _module(frame.f_back)
        else:
            return
        if mod is None:
            return
        seq = self.stays.setdefault(threading.get_ident(), [])
        if not seq or seq[-1] != mod:
            seq.append(mod)
        if event == "call" and frame.f_code.co_name == "step" and mod == "mistral_trt.runtime.ort":
            self.steps.append(len(seq) - 1)

    @contextlib.contextmanager
    def on(self):
        sys.setprofile(self)
        threading.setprofile(self)  # threads started from here on
        try:
            yield self
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    def counts(self) -> tuple[int, int, int]:
        """(stays, modules, returns), added over threads."""
        stays = modules = returns = 0
        for seq in self.stays.values():
            stays += len(seq)
            modules += len(set(seq))
            returns += len(seq) - len(set(seq))
        return stays, modules, returns


def generate_walk(export: str, n: int) -> Tracer:
    from mistral_trt.main import main

    t = Tracer()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), t.on():
        rc = main(["generate", export, "--prompt", "Count from one to ten in words, separated by commas.",
                   "--max-new-tokens", str(n), "--speculate", "off"])
    assert rc == 0, rc
    return t


def token_walk(export: str) -> tuple[int, int, int]:
    """The stays from one decode step's entry into the backend to the next one's: the loop of one token."""
    generate_walk(export, 2)  # imports, so the walk is the loop's, not the first call's
    t = generate_walk(export, 8)
    (seq,) = [s for s in t.stays.values() if len(s) > 1]
    a, b = t.steps[4], t.steps[5]  # two decode steps in the middle (step 0 is the prefill)
    walk = seq[a:b]
    return len(walk), len(set(walk)), len(walk) - len(set(walk))


def request_walk(export: str) -> tuple[int, int, int]:
    from starlette.testclient import TestClient

    from mistral_trt.serve.api import ServerState, create_app
    from mistral_trt.serve.server import load

    state = ServerState(model_name="m")
    body = {"model": "m", "prompt": "Count from one to ten.", "max_tokens": 1, "temperature": 0}
    t = Tracer(active=False)
    with t.on():  # the server's threads start inside, so they carry the profiler
        load(state, export, "cpu", 2, 8, None, 512)
        with TestClient(create_app(state)) as client:
            assert client.post("/v1/completions", json=body).status_code == 200  # warm: imports and first binds
            t.active = True
            r = client.post("/v1/completions", json=body)
            t.active = False
            assert r.status_code == 200, r.text
    state.scheduler.stop()
    return t.counts()


def main() -> None:
    export = sys.argv[1]
    import mistral_trt

    print(f"code: {list(mistral_trt.__path__)[0]}")
    print("| walk | stays | modules | returns |\n|---|---|---|---|")
    for name, fn in (("one decode token (generate)", token_walk), ("one request (/v1/completions)", request_walk)):
        s, m, r = fn(export)
        print(f"| {name} | {s} | {m} | {r} |")


if __name__ == "__main__":
    main()
