"""mistral_trt.serve: `mistral-trt serve`, an OpenAI-compatible streaming server with continuous batching, over
the runtime (the [serve] extra: starlette, uvicorn, prometheus-client)."""
