"""The Triton model: copied as REPO/NAME/1/model.py by `mistral-trt triton-repo` (serve/triton.py), run by Triton's
python backend, one process per instance. Each instance loads the export through the runtime and runs the same
continuous-batching scheduler as `mistral-trt serve` (serve/scheduler.py); responses are decoupled, so a request
with `stream: true` gets one response per piece of new text (Triton's /generate_stream and gRPC streaming), one
without gets a single response with the whole text (/generate).

Inputs (config.pbtxt): `text_input` (a user message, in the model's chat format; with `raw: true` the text as it
is), `messages` (a JSON conversation, formatted by runtime/chat.py) or `input_ids` (tokens, for clients that
tokenize), and optionally `max_tokens` (default: the room the context leaves), `temperature` (default 1, as the HTTP
API; 0: greedy), `top_p`, `top_k`, `min_p`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `seed`, `stop` (strings), `stream`, `ignore_eos` (benchmarks), `json_schema` (the reply must match it). Output:
`text_output`. The rules and messages are runtime/request.py's, the same as the CLI's and the HTTP API's.
Needs mistral-trt importable by the python backend (a wheel of this repository installed in the server's Python:
docs/triton.md).
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.request import TRITON, Request, build_request
from mistral_trt.runtime.sampling import SAMPLING_RULES
from mistral_trt.runtime.structured import Grammar
from mistral_trt.runtime.speculative import Speculation
from mistral_trt.runtime.tokenizer import Tokenizer
from mistral_trt.serve.metrics import PER_REQUEST, Metrics
from mistral_trt.serve.scheduler import QueueFull, Scheduler

BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30]


class _Metric:
    """One Triton metric behind the prometheus_client calls the scheduler makes (inc, set, observe)."""

    def __init__(self, family, kind: str, labels: dict, buckets=BUCKETS):
        self.kind = kind
        if kind == "histogram":
            try:
                self.m = family.Metric(labels=labels, buckets=list(buckets))
            except Exception:  # a python backend without histograms: the sum and count as counters
                self.m = None
        else:
            self.m = family.Metric(labels=labels)

    def inc(self, v: float = 1.0) -> None:
        self.m.increment(float(v))

    def set(self, v: float) -> None:
        self.m.set(float(v))

    def observe(self, v: float) -> None:
        if self.m is not None:
            self.m.observe(float(v))


class TritonMetrics:
    """serve/metrics.py's names, in Triton's own /metrics (port 8002), labelled by model and instance."""

    def __init__(self, model: str, instance: str, slots: int):
        labels = {"model": model, "instance": instance}
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE,
                 "histogram": getattr(pb_utils.MetricFamily, "HISTOGRAM", None)}
        self.families = []

        def metric(name: str, help_: str, kind: str, buckets=BUCKETS):
            k = kinds[kind]
            if k is None:
                kind, k = "gauge", kinds["gauge"]
            fam = pb_utils.MetricFamily(name=name, description=help_, kind=k)
            self.families.append(fam)  # a family must outlive its metrics
            return _Metric(fam, kind, labels, buckets)

        self.waiting = metric("mistral_trt_requests_waiting", "Requests waiting for a slot", "gauge")
        self.running = metric("mistral_trt_requests_running", "Sequences in the running batch", "gauge")
        self.slots_in_use = metric("mistral_trt_kv_slots_in_use", "KV-cache slots holding a sequence", "gauge")
        metric("mistral_trt_kv_slots", "KV-cache slots", "gauge").set(slots)
        self.prompt_tokens = metric("mistral_trt_prompt_tokens_total", "Prompt tokens fed", "counter")
        self.generation_tokens = metric("mistral_trt_generation_tokens_total", "Tokens generated", "counter")
        self.ttft = metric("mistral_trt_time_to_first_token_seconds", "Arrival to first token", "histogram")
        self.itl = metric("mistral_trt_inter_token_latency_seconds", "Time between a sequence's tokens", "histogram")
        self.step_errors = metric("mistral_trt_step_errors_total", "Model steps that failed", "counter")
        self.finished = metric("mistral_trt_requests_total", "Finished requests", "counter")
        self.drafted = metric("mistral_trt_spec_decode_num_draft_tokens_total", "Speculative draft tokens proposed",
                              "counter")
        self.accepted = metric("mistral_trt_spec_decode_num_accepted_tokens_total", "Speculative draft tokens the "
                               "model kept", "counter")
        self.prefix_queries = metric("mistral_trt_prefix_cache_queries_total", "Prompt tokens looked up in the "
                                     "prefix cache", "counter")
        self.prefix_hits = metric("mistral_trt_prefix_cache_hits_total", "Prompt tokens the prefix cache held",
                                  "counter")
        self.kv_usage = metric("mistral_trt_kv_cache_usage_perc", "Fraction of the KV cache's positions holding "
                               "tokens", "gauge")
        self.prefix_kept_bytes = metric("mistral_trt_prefix_cache_kept_bytes", "Host memory holding prefixes whose "
                                        "slot was taken by another request", "gauge")
        for attr, name, help_, buckets in PER_REQUEST:
            setattr(self, attr, metric(f"mistral_trt_{name}", help_, "histogram", buckets))

    observe_request = Metrics.observe_request


def _scalar(request, name: str, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise UserError(f"input {name!r}: expected one value, got {a.size}")
    v = a[0]
    return v.decode("utf-8") if isinstance(v, bytes) else v.item()


def _strings(request, name: str) -> list[str]:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        folder = params.get("export_dir", "export")
        self.folder = folder if os.path.isabs(folder) else os.path.join(here, folder)
        self.backend = open_backend(self.folder, params.get("provider", "cpu"))
        self.manifest = self.backend.manifest
        self.tok = Tokenizer.for_export(self.folder, self.manifest)
        max_batch = int(params.get("max_batch", "8"))
        self.metrics = TritonMetrics(args["model_name"], args.get("model_instance_name", "0"), max_batch)
        self.sched = Scheduler(self.backend, self.tok, max_batch=max_batch, max_queue=int(params.get("max_queue", "64")),
                               max_context=int(params["max_context"]) if params.get("max_context") else None,
                               metrics=self.metrics,
                               speculate=Speculation.parse(params["speculate"]) if params.get("speculate") else None)
        self.sched.start()

    # -- one request ---------------------------------------------------------------------------------------
    def _request(self, request) -> tuple[Request, bool]:
        params = {name: _scalar(request, name) for name in ("raw", "max_tokens", "ignore_eos", *SAMPLING_RULES)}
        params["text"] = _scalar(request, "text_input")
        messages = _scalar(request, "messages")
        if messages is not None:
            try:
                params["messages"] = json.loads(messages)
            except json.JSONDecodeError as e:
                raise UserError(f"input 'messages': not valid JSON: {e}") from None
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids is not None:
            params["ids"] = ids.as_numpy().reshape(-1).tolist()
        stop = _strings(request, "stop")
        params["stop"] = stop or None
        schema = _scalar(request, "json_schema")
        if schema is not None:  # a JSON schema as text: the reply must match it (runtime/structured.py)
            try:
                params["grammar"] = Grammar("json_schema", json.dumps(json.loads(schema), sort_keys=True),
                                            "input 'json_schema'")
            except json.JSONDecodeError as e:
                raise UserError(f"input 'json_schema': not valid JSON: {e}") from None
        stream = _scalar(request, "stream", False)
        req = build_request(params, self.tok, self.manifest, self.sched.max_context, TRITON)
        return req, bool(stream)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req, stream = self._request(request)
                self._submit(request, sender, req, stream)
            except (UserError, QueueFull, ValueError, TypeError) as e:
                self.metrics.finished.inc()
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None  # decoupled: responses go through each request's sender

    def _submit(self, request, sender, req: Request, stream: bool) -> None:
        text, lock, state = [], threading.Lock(), {}

        def out(s: str):
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text_output", np.array([s.encode("utf-8")], dtype=np.object_))])

        def emit(ev):  # from the scheduler's worker thread
            with lock:
                if state.get("done"):
                    return
                if request.is_cancelled() and not ev.finish_reason:
                    state["handle"].cancel()  # the client went away: the slot is free after the next step
                    return
                if ev.error:
                    state["done"] = True
                    self.metrics.finished.inc()
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(ev.error)),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                if stream and ev.text:
                    sender.send(out(ev.text))
                text.append(ev.text)
                if ev.finish_reason:
                    state["done"] = True
                    self.metrics.finished.inc()
                    if stream:
                        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    else:
                        sender.send(out("".join(text)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        with lock:  # the first event cannot come before the handle is known
            state["handle"] = self.sched.submit(req, emit)

    def finalize(self):
        self.sched.stop(timeout=5.0)
