"""`GET /metrics`: Prometheus text, from prometheus_client with a registry of our own. The names and meanings are
vLLM's (`vllm:e2e_request_latency_seconds` is `mistral_trt_e2e_request_latency_seconds` here), so dashboards carry
over; docs/grafana/mistral-trt-serve.json is one built on them.

Per request, from the scheduler's clock (arrival is when the request was submitted, after its body was read and
tokenized):

    arrival --queue--> admitted to a slot --prefill--> first token --decode--> last token
    |<------------------------------- e2e_request_latency ------------------------------>|
"""
from __future__ import annotations

LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
REQUEST = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PER_REQUEST = [  # (attribute, name, help, buckets): requests that ran to a finish reason (stop, length, a failed step)
    ("e2e", "e2e_request_latency_seconds", "Arrival to the last token", REQUEST),
    ("queue_time", "request_queue_time_seconds", "Arrival to admission into a slot", REQUEST),
    ("prefill_time", "request_prefill_time_seconds", "Admission to the first token", REQUEST),
    ("decode_time", "request_decode_time_seconds", "First token to the last", REQUEST),
    ("request_prompt_tokens", "request_prompt_tokens", "Prompt tokens of a request", TOKENS),
    ("request_generation_tokens", "request_generation_tokens", "Tokens a request generated", TOKENS),
]


class Metrics:
    def __init__(self, model: str, slots: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("mistral_trt_requests", "Completion requests answered, by the HTTP status sent and the "
                                "finish reason (499: the client went away)", ["status", "finish_reason"], registry=r)
        self.waiting = Gauge("mistral_trt_requests_waiting", "Requests waiting for a slot", registry=r)
        self.running = Gauge("mistral_trt_requests_running", "Sequences in the running batch", registry=r)
        self.slots_in_use = Gauge("mistral_trt_kv_slots_in_use", "KV-cache slots holding a sequence", registry=r)
        slots_total = Gauge("mistral_trt_kv_slots", "KV-cache slots", registry=r)
        slots_total.set(slots)
        self.prompt_tokens = Counter("mistral_trt_prompt_tokens", "Prompt tokens fed", registry=r)
        self.generation_tokens = Counter("mistral_trt_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("mistral_trt_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY)
        self.itl = Histogram("mistral_trt_inter_token_latency_seconds", "Time between a sequence's tokens", registry=r,
                             buckets=LATENCY)
        for attr, name, help_, buckets in PER_REQUEST:
            setattr(self, attr, Histogram(f"mistral_trt_{name}", help_, registry=r, buckets=buckets))
        self.drafted = Counter("mistral_trt_spec_decode_num_draft_tokens", "Speculative draft tokens proposed",
                               registry=r)
        self.accepted = Counter("mistral_trt_spec_decode_num_accepted_tokens", "Speculative draft tokens the model "
                                "kept", registry=r)
        self.prefix_queries = Counter("mistral_trt_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache", registry=r)
        self.prefix_hits = Counter("mistral_trt_prefix_cache_hits", "Prompt tokens the prefix cache held (not fed "
                                   "again)", registry=r)
        self.kv_usage = Gauge("mistral_trt_kv_cache_usage_perc", "Fraction of the KV cache's positions holding "
                              "tokens (running or kept for reuse)", registry=r)
        self.prefix_kept_bytes = Gauge("mistral_trt_prefix_cache_kept_bytes", "Host memory holding prefixes whose "
                                       "slot was taken by another request (serve --prefix-cache-mib)", registry=r)
        self.step_errors = Counter("mistral_trt_step_errors", "Model steps that failed", registry=r)
        self.connections_refused = Counter("mistral_trt_connections_refused", "Connections past --max-connections",
                                           registry=r)
        info = Gauge("mistral_trt_model_info", "The model served", ["model"], registry=r)
        info.labels(model=model).set(1)

    def observe_request(self, arrived: float, admitted: float, first: float, end: float, prompt: int,
                        generated: int) -> None:
        """A request that ran to a finish reason (stop, length or error); times from time.perf_counter()."""
        self.e2e.observe(end - arrived)
        self.queue_time.observe(admitted - arrived)
        self.prefill_time.observe(first - admitted)
        self.decode_time.observe(end - first)
        self.request_prompt_tokens.observe(prompt)
        self.request_generation_tokens.observe(generated)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
