"""`GET /metrics`: Prometheus text, from prometheus_client with a registry of our own (names after vLLM's)."""
from __future__ import annotations


class Metrics:
    def __init__(self, model: str, slots: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("mistral_trt_requests", "Finished requests by HTTP status and finish reason",
                                ["status", "finish_reason"], registry=r)
        self.waiting = Gauge("mistral_trt_requests_waiting", "Requests waiting for a slot", registry=r)
        self.running = Gauge("mistral_trt_requests_running", "Sequences in the running batch", registry=r)
        self.slots_in_use = Gauge("mistral_trt_kv_slots_in_use", "KV-cache slots holding a sequence", registry=r)
        slots_total = Gauge("mistral_trt_kv_slots", "KV-cache slots", registry=r)
        slots_total.set(slots)
        self.prompt_tokens = Counter("mistral_trt_prompt_tokens", "Prompt tokens fed", registry=r)
        self.generation_tokens = Counter("mistral_trt_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
        self.ttft = Histogram("mistral_trt_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=buckets)
        self.itl = Histogram("mistral_trt_inter_token_latency_seconds", "Time between a sequence's tokens", registry=r,
                             buckets=buckets)
        self.step_errors = Counter("mistral_trt_step_errors", "Model steps that failed", registry=r)
        info = Gauge("mistral_trt_model_info", "The model served", ["model"], registry=r)
        info.labels(model=model).set(1)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
