"""A conversation that keeps its KV cache between turns: each turn's prompt is fed from where it differs from what
the cache holds (runtime/cache.py InPlaceCache.admit_prefix), so a turn pays for its new messages, not the history.

    session = Session(Generator(open_backend("build/onnx/smollm2-135m-instruct-fused-fp32")))
    history = [{"role": "user", "content": "Hi!"}]
    req = build_request({"messages": history, "temperature": 0}, tok, gen.backend.manifest, gen.max_context)
    for update in session.run(req, tok):          # an Update per step (runtime/sequence.py), as Generator.run
        ...
    session.cached                                # prompt tokens the cache held already in the last run

The fused graph only: its cache is per row and ragged. A portable graph or a TensorRT engine (columns shared by
the rows of a batch) runs each turn from a fresh cache, as before (`cached` stays 0). The cache is sized for the
model's whole context (plus speculative drafts); host memory for it is reserved, and touched only as it fills.
Greedy replies are those of a fresh run, token for token (fp32; tests/test_prefix_cache.py).
"""
from __future__ import annotations

from .generate import Generator
from .request import Request
from .speculative import MAX_K, Speculation


class Session:
    def __init__(self, gen: Generator):
        self.gen = gen
        self.cache = (gen.backend.new_cache(1, gen.max_context + MAX_K) if gen.backend.ragged and gen.keep is None
                      else None)
        self.cached = 0

    def run(self, req: Request, tok=None, speculation: Speculation | None = None):
        """Generator.run for one request on the kept cache: yields its Update per step (None at the end)."""
        if self.cache is not None and self.cache.active[0]:
            self.cache.release(0)  # a previous run stopped early (the caller broke out of its loop)
        for (update,) in self.gen.run([req], tok, speculation, cache=self.cache):
            if update is not None and update.output is not None:
                self.cached = update.output.cached_tokens
            yield update

    def reset(self) -> None:
        """Forget what the cache holds (the next run starts cold)."""
        if self.cache is not None:
            self.cache.release(0)
            self.cache.held[0] = []
