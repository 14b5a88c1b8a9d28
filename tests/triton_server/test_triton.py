"""Our export as a Triton model, tested against a real tritonserver (the one nvidia-pytriton bundles) with the real
tritonclient, on this CPU: `make test-triton` (its own venv: nvidia-pytriton pins numpy < 2).

MISTRAL_TRT_TRITON_EXPORT: the demo model's fused export. The reference for every text is `mistral-trt generate`
(the CLI of this venv: the same runtime, no server in between)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

EXPORT = Path(os.environ["MISTRAL_TRT_TRITON_EXPORT"])
CLI = str(Path(sys.executable).parent / "mistral-trt")
PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 17 times 23?", "Name three planets.",
           "Explain recursion to a child.", "How do vaccines work?", "Give me a pancake recipe.", "What is DNA?"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def reference(prompt: str, n: int) -> str:
    r = subprocess.run([CLI, "generate", str(EXPORT), "--prompt", prompt, "--max-new-tokens", str(n), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["text"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    r = subprocess.run([CLI, "triton-repo", str(EXPORT), "-o", str(repo), "--name", "smollm2", "--max-batch", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spec = repo.parent / "spec"  # a second model in the same server: every request speculative (--speculate)
    r = subprocess.run([CLI, "triton-repo", str(EXPORT), "-o", str(spec), "--name", "smollm2-spec", "--max-batch", "2",
                        "--speculate", "ngram"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.move(str(spec / "smollm2-spec"), str(repo / "smollm2-spec"))
    http, grpc, metrics = free_ports(3)
    log = open(repo.parent / "tritonserver.log", "w")
    proc = subprocess.Popen([CLI, "triton-serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200:
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        assert proc.poll() is None and time.time() < deadline, (repo.parent / "tritonserver.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"http": http, "grpc": grpc, "metrics": metrics, "proc": proc, "repo": repo, "log": repo.parent / "tritonserver.log"}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)


def post(server, path: str, body: dict, model: str = "smollm2") -> tuple[int, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{server['http']}/v2/models/{model}/{path}",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            raw, status = resp.read().decode(), resp.status
    except urllib.error.HTTPError as e:  # an error: JSON, or for generate_stream one SSE event
        raw, status = e.read().decode(), e.code
    if path == "generate_stream":
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
        return status, events
    return status, json.loads(raw)


def stream_text(server, prompt: str, n: int) -> tuple[str, int]:
    status, events = post(server, "generate_stream", {"text_input": prompt, "max_tokens": n, "stream": True,
                                                        "temperature": 0.0})
    assert status == 200, events
    assert all("error" not in e for e in events), events
    return "".join(e["text_output"] for e in events), len(events)


def test_generate_stream_equals_mistral_trt_generate(server):
    """SSE from /generate_stream, each event only the new text, joined: the CLI's greedy text."""
    for prompt in PROMPTS[:3]:
        text, events = stream_text(server, prompt, 48)
        assert text == reference(prompt, 48) and events > 10, prompt


def test_generate_without_streaming_is_one_response(server):
    status, body = post(server, "generate", {"text_input": PROMPTS[0], "max_tokens": 24, "temperature": 0.0})
    assert status == 200 and body["text_output"] == reference(PROMPTS[0], 24)
    messages = json.dumps([{"role": "user", "content": PROMPTS[1]}])
    status, body = post(server, "generate", {"messages": messages, "max_tokens": 16, "temperature": 0.0})
    assert status == 200 and body["text_output"] == reference(PROMPTS[1], 16)


def test_grpc_streaming_equals_mistral_trt_generate(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server['grpc']}")
    got, done = [], threading.Event()

    def callback(result, error):
        assert error is None, error
        resp = result.get_response()
        out = result.as_numpy("text_output")
        if out is not None:
            got.extend(x.decode() for x in out.reshape(-1))
        if resp.parameters.get("triton_final_response") and resp.parameters["triton_final_response"].bool_param:
            done.set()

    inputs = []
    for name, arr, dtype in (("text_input", np.array([PROMPTS[2].encode()], np.object_), "BYTES"),
                             ("max_tokens", np.array([40], np.int32), "INT32"),
                             ("temperature", np.array([0.0], np.float32), "FP32"),
                             ("stream", np.array([True]), "BOOL")):
        t = grpcclient.InferInput(name, arr.shape, dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    client.start_stream(callback=callback)
    try:
        client.async_stream_infer("smollm2", inputs, enable_empty_final_response=True)
        assert done.wait(timeout=300)
    finally:
        client.stop_stream()
        client.close()
    assert "".join(got) == reference(PROMPTS[2], 40) and len(got) > 5


def test_json_schema_input_constrains_the_reply(server, tmp_path):
    """The `json_schema` input: the reply is the CLI's `generate --json-schema` reply, and it is JSON with the
    schema's keys and types; a schema the engine cannot compile is Triton's error naming the input."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Spain"]}},
              "required": ["city", "country"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    prompt = "Name a city in France, as JSON."
    status, body = post(server, "generate", {"text_input": prompt, "max_tokens": 60, "temperature": 0.0,
                                             "json_schema": json.dumps(schema)})
    r = subprocess.run([CLI, "generate", str(EXPORT), "--prompt", prompt, "--max-new-tokens", "60", "--json-schema",
                        str(tmp_path / "s.json"), "--json"], capture_output=True, text=True, timeout=300)
    assert status == 200 and r.returncode == 0 and body["text_output"] == json.loads(r.stdout)["text"], r.stderr
    reply = json.loads(body["text_output"])
    assert set(reply) == {"city", "country"} and reply["country"] in ("France", "Spain") and len(reply["city"]) <= 20
    status, body = post(server, "generate", {"text_input": prompt, "max_tokens": 8, "json_schema": '{"type": "strin"}'})
    assert status != 200 and "input 'json_schema'" in json.dumps(body), body


def test_eight_concurrent_streams_give_the_same_text_as_alone(server):
    alone = {p: stream_text(server, p, 32)[0] for p in PROMPTS}
    results, errors = {}, []

    def run(p):
        try:
            results[p] = stream_text(server, p, 32)[0]
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and results == alone


def test_bad_requests_get_tritons_error_and_the_model_keeps_serving(server):
    status, body = post(server, "generate", {"max_tokens": 8})
    assert status == 400 and "give the prompt as one of input 'text_input'" in body["error"]
    status, body = post(server, "generate", {"text_input": "Hi", "max_tokens": -3})
    assert status == 400 and "max_tokens' -3: expected an integer >= 1" in body["error"]
    status, events = post(server, "generate_stream", {"text_input": "Hi", "max_tokens": 8, "top_p": 0.5, "stream": True,
                                                      "temperature": 0.0})
    assert status == 400 and "input 'top_p' 0.5 applies to sampling" in events[0]["error"], events
    status, body = post(server, "generate", {"input_ids": [10**9], "max_tokens": 2})
    assert status == 400 and "input_ids" in body["error"]
    assert stream_text(server, PROMPTS[0], 8)[0] == reference(PROMPTS[0], 8)  # still serving


def test_stop_cases_stream_what_is_returned(server):
    """tests/stop_cases.py's cases through Triton: a stop spanning tokens, inside one piece, several stops, at EOS, and
    with speculation (the repository's second model, triton-repo --speculate). /generate_stream's events joined and
    /generate's text both equal the CLI's greedy reply cut before the earliest stop."""
    from stop_cases import GROUNDED, stop_cases

    from mistral_trt.runtime.manifest import Manifest
    from mistral_trt.runtime.tokenizer import Tokenizer

    r = subprocess.run([CLI, "generate", str(EXPORT), "--prompt", GROUNDED, "--max-new-tokens", "80", "--json",
                        "--speculate", "off"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout)
    tok = Tokenizer.for_export(EXPORT, Manifest.load(EXPORT))
    cases = stop_cases(ref["text"], ref["ids"], tok, ended_by_eos=len(ref["ids"]) < 80)
    assert {c.name for c in cases} >= {"spans tokens", "inside a piece", "several stops", "at EOS", "with speculation"}
    for c in cases:
        model = "smollm2-spec" if c.speculate else "smollm2"
        body = {"text_input": GROUNDED, "max_tokens": 80, "temperature": 0.0, "stop": c.stops}
        status, whole = post(server, "generate", body, model)
        status2, events = post(server, "generate_stream", {**body, "stream": True}, model)
        assert status == status2 == 200, (whole, events)
        streamed = "".join(e["text_output"] for e in events)
        assert whole["text_output"] == streamed == c.want, (c, whole, streamed)


def test_one_validation_table(server):
    """tests/validation_cases.py, as tests/test_serve.py runs it against the CLI and the HTTP API: the same verdicts,
    and the same messages once Triton's input names are read as the fields' names."""
    from validation_cases import ACCEPTED, CASES, canonical

    for fields, fragment in CASES + [(f, None) for f in ACCEPTED]:
        status, body = post(server, "generate", {"text_input": "Hi", **fields})
        if fragment is None:
            assert status == 200, (fields, body)
            continue
        assert status == 400 and fragment in canonical(body["error"]), (fields, body)
        r = subprocess.run([CLI, "generate", str(EXPORT), "--prompt", "Hi", "--speculate", "off",
                            *__import__("validation_cases").cli_args(fields)], capture_output=True, text=True)
        from_cli = canonical(r.stderr.strip().splitlines()[-1].split("error: ", 1)[1])
        assert r.returncode == 2 and canonical(body["error"]) == from_cli, (fields, body, r.stderr)


def test_metrics_have_tritons_and_ours(server):
    stream_text(server, PROMPTS[3], 8)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).read().decode()
    # ours for the model under test: the repository also holds smollm2-spec (2 slots), whose lines carry its name
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("mistral_trt_", "nv_inference_request_success")) and 'model="smollm2"' in line}
    assert values["nv_inference_request_success"] >= 1  # Triton's own
    assert values["mistral_trt_generation_tokens_total"] >= 8 and values["mistral_trt_kv_slots"] == 8
    assert "mistral_trt_time_to_first_token_seconds_count" in values and values["mistral_trt_requests_running"] == 0


def test_triton_repo_refuses_bad_input(tmp_path):
    for args, says in ((["triton-repo", str(tmp_path), "-o", str(tmp_path / "r")], "no manifest"),
                       (["triton-repo", str(EXPORT), "-o", str(tmp_path / "r"), "--name", "a b"], "--name 'a b'"),
                       (["triton-serve", str(tmp_path)], "not a Triton model repository")):
        r = subprocess.run([CLI, *args], capture_output=True, text=True)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("mine")
    r = subprocess.run([CLI, "triton-repo", str(EXPORT), "-o", str(tmp_path / "mine"), "--force"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and (tmp_path / "mine" / "thesis.txt").read_text() == "mine"


def test_sigterm_stops_the_server_cleanly(server):
    """Last (module order): SIGTERM to `triton-serve` stops tritonserver, which unloads the model and exits; the
    command exits 0."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    log = server["log"].read_text()
    assert "successfully unloaded" in log or "All models are stopped" in log, log[-2000:]
