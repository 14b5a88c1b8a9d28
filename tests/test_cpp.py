"""The embedded C++ runtime (cpp/): the same exports driven from C++ through the manifest, tested against the
Python runtime, HF transformers and mistral-common, not against itself.

The binaries come from `make cpp` (build/cpp), run here once per session; MISTRAL_TRT_CPP_BUILD points the suite
at another build (`make cpp-asan`: the same tests under AddressSanitizer + UBSan)."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, cpp_generate, mistral_tokenizer_file, py_generate, run_cpp
from mistral_trt.main import main
from mistral_trt.runtime.manifest import Manifest
from test_generate import hf_greedy

ROOT = Path(__file__).resolve().parents[1]  # the `cpp` fixture (conftest.py) builds it with `make cpp`
SANITIZED = bool(os.environ.get("MISTRAL_TRT_CPP_SANITIZED"))


def error_line(r: subprocess.CompletedProcess) -> str:
    """A refused command: exit 2, no crash, its last stderr line the one error (argparse-style usage may precede)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("mistral-trt-cpp ") and sum("error:" in x for x in lines) == 1, r.stderr
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr
    return lines[-1]


# -- greedy tokens against the Python runtime and HF ---------------------------------------------------------
@pytest.mark.parametrize("graph", ["portable", "fused"])
def test_greedy_equals_python_and_hf_with_a_window(cpp, graph, tiny_exports, tiny_fused, tiny_window, capsys):
    """A tiny random Mistral with the real v1 tokenizer and a window of 8, run to 6x the window and beyond: the
    prompt through sentencepiece and the mistral-v1 formatter in C++, the trimmed double-buffered cache (portable)
    or the in-place one (fused); the same ids as the Python runtime and HF's own generate."""
    folder = tiny_exports["window", "fp32"] if graph == "portable" else tiny_fused["window"]
    args = ["--prompt", "Tell me a long story about the sea and the sky.", "--max-new-tokens", 48]
    got, want = cpp_generate(cpp, folder, *args), py_generate(capsys, folder, *args)
    assert got["prompt_ids"] == want["prompt_ids"] and len(got["prompt_ids"]) > 8
    assert got["ids"] == want["ids"] and got["text"] == want["text"]
    n = len(got["ids"])
    assert len(got["prompt_ids"]) + n >= 6 * 8
    hf = hf_greedy(tiny_window, got["prompt_ids"], 48)
    assert hf[:n] == got["ids"] and (n == 48 or hf[n] == 2)  # stopped early only at EOS
    assert got["stats"]["prompt_tokens"] == len(got["prompt_ids"]) and got["stats"]["new_tokens"] >= n


@pytest.mark.parametrize("graph", ["portable", "fused"])
def test_greedy_equals_python_without_a_window_raw_and_messages(cpp, graph, tiny_exports, tiny_fused, tmp_path, capsys):
    folder = tiny_exports["full", "fp32"] if graph == "portable" else tiny_fused["full"]
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"},
                                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]))
    for args in (["--prompt", "Once upon a time", "--raw"], ["--messages", conv], ["--ids", "1,733,16289,28793"]):
        got, want = cpp_generate(cpp, folder, *args, "--max-new-tokens", 20), py_generate(capsys, folder, *args,
                                                                                          "--max-new-tokens", 20)
        assert (got["prompt_ids"], got["ids"], got["text"]) == (want["prompt_ids"], want["ids"], want["text"]), args


def test_fp16_export_equals_python(cpp, tiny_exports, capsys):
    """fp16 KV cache and logits (converted to float32 for sampling, as the Python runtime does)."""
    folder = tiny_exports["full", "fp16"]
    args = ["--prompt", "Count to ten", "--max-new-tokens", 16]
    assert cpp_generate(cpp, folder, *args)["ids"] == py_generate(capsys, folder, *args)["ids"]


def test_sampling_is_seeded_and_stop_strings_end_the_text(cpp, tiny_exports, capsys):
    folder = tiny_exports["full", "fp32"]
    args = ["--prompt", "Hi", "--max-new-tokens", 24, "--temperature", 0.8, "--top-p", 0.9, "--top-k", 50]
    a, b = (cpp_generate(cpp, folder, *args, "--seed", 7) for _ in range(2))
    c = cpp_generate(cpp, folder, *args, "--seed", 8)
    greedy = cpp_generate(cpp, folder, "--prompt", "Hi", "--max-new-tokens", 24)
    assert a["ids"] == b["ids"] and a["ids"] != c["ids"] and a["ids"] != greedy["ids"]
    text = greedy["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    cut = cpp_generate(cpp, folder, "--prompt", "Hi", "--max-new-tokens", 24, "--stop", stop)
    assert cut["text"] == text[:text.index(stop)] and cut["stop_reason"] == "stop"
    want = py_generate(capsys, folder, "--prompt", "Hi", "--max-new-tokens", 24, "--stop", stop)
    assert cut["text"] == want["text"]
    streamed = run_cpp(cpp, "generate", folder, "--prompt", "Hi", "--max-new-tokens", 24, "--stop", stop).stdout
    assert streamed == cut["text"] + "\n"  # a possible stop string is held back, never printed and taken back


# -- tokenize against mistral-common (not marked slow at 3 s: make cpp-asan runs it under the sanitizers) ------------
def test_tokenize_equals_mistral_common(cpp, tmp_path):
    """The conversations the Python tests use (test_tokenizer_chat): served form against mistral-common's default
    validation (refused where it refuses, with one line and exit 2), the training form (a final assistant reply)
    against its finetuning validation."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from test_tokenizer_chat import conversations

    refs = {mode: MistralTokenizer.from_file(str(mistral_tokenizer_file()), mode=mode)
            for mode in (ValidationMode.test, ValidationMode.finetuning)}
    tok_file = tmp_path / "tokenizer.model"
    shutil.copy(mistral_tokenizer_file(), tok_file)
    agreed = refused = 0
    for i, conv in enumerate(list(conversations(120)) + list(conversations(60, seed=3))):
        f = tmp_path / f"c{i}.json"
        f.write_text(json.dumps(conv))
        mode = ValidationMode.finetuning if conv[-1]["role"] == "assistant" else ValidationMode.test
        try:
            want = refs[mode].encode_chat_completion(ChatCompletionRequest(messages=conv)).tokens
        except Exception:
            want = None
        if want is None and mode == ValidationMode.finetuning:
            continue  # stricter than ours for training forms (test_tokenizer_chat compares only what it accepts)
        r = run_cpp(cpp, "tokenize", "--tokenizer", tok_file, "--messages", f, "--format", "mistral-v1", ok=False)
        if want is None:
            assert "conversation" in error_line(r)
            refused += 1
        else:
            assert r.returncode == 0 and json.loads(r.stdout)["ids"] == want, conv
            agreed += 1
    assert agreed > 60 and refused > 20


def test_tokenize_export_equals_python(cpp, tiny_exports, tmp_path, capsys):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello ✓",
                                                                      "prefix": True}]))
    folder = tiny_exports["full", "fp32"]
    got = json.loads(run_cpp(cpp, "tokenize", folder, "--messages", conv).stdout)
    capsys.readouterr()
    assert main(["tokenize", str(folder), "--messages", str(conv)]) == 0
    assert got == json.loads(capsys.readouterr().out)


# -- bad input: one line, exit 2, the Python runtime's words ---------------------------------------------------
CORRUPTIONS = [  # (field path, new value or "DELETE")
    (("schema_version",), 1), (("schema_version",), "2"), (("model",), "DELETE"), (("model", "num_layers"), "30"),
    (("model", "num_kv_heads"), 3), (("model", "rope_theta"), -1.5), (("model", "sliding_window"), 0),
    (("model", "architecture"), "LlamaForCausalLM"), (("dtype",), "bf16"), (("eos_token_id",), [2, 99999]),
    (("bos_token_id",), True), (("tokenizer", "vocab_size"), 0), (("tokenizer", "file"), "other.model"),
    (("cache", "max_context"), 10**9), (("cache", "keep"), 7), (("cache", "layout"), "in-place"),
    (("files", "model.onnx"), "abc"), (("inputs", 0, "dtype"), "int32"), (("inputs", 1, "dims"), ["batch", "seq"]),
    (("outputs",), []), (("tokenizer_files",), ["../x"]), (("model", "vocab_size"), 10**12),
]


@pytest.mark.parametrize("path,value", CORRUPTIONS, ids=lambda x: str(x)[:30])
def test_bad_manifest_gets_the_python_runtimes_error(cpp, tiny_exports, tmp_path, capsys, path, value):
    folder = shutil.copytree(tiny_exports["full", "fp32"], tmp_path / "out")
    raw = json.loads((folder / "manifest.json").read_text())
    obj = raw
    for key in path[:-1]:
        obj = obj[key]
    if value == "DELETE":
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    (folder / "manifest.json").write_text(json.dumps(raw, indent=2))
    args = ["generate", folder, "--prompt", "Hi", "--max-new-tokens", "2"]
    line = error_line(run_cpp(cpp, *args, ok=False))
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    py = capsys.readouterr().err.strip().split("\n")[-1]
    assert line.split(": error: ", 1)[1] == py.split(": error: ", 1)[1]


def test_bad_input_is_one_line_and_exit_2(cpp, tiny_exports, tiny_fused, tmp_path, capsys):
    good = tiny_exports["full", "fp32"]
    missing = error_line(run_cpp(cpp, "generate", tmp_path / "nothing", "--prompt", "Hi", ok=False))
    assert "manifest.json: no manifest" in missing
    broken = shutil.copytree(good, tmp_path / "broken")
    (broken / "manifest.json").write_text("{not json")
    assert "manifest.json: not valid JSON" in error_line(run_cpp(cpp, "generate", broken, "--prompt", "Hi", ok=False))
    other = shutil.copytree(good, tmp_path / "other")
    shutil.copy(tiny_fused["full"] / "model.onnx", other / "model.onnx")  # another graph in the folder
    assert "model.onnx: sha256" in error_line(run_cpp(cpp, "generate", other, "--prompt", "Hi", ok=False))
    from mistral_trt.runtime.integrity import sha256

    raw = json.loads((other / "manifest.json").read_text())
    raw["files"]["model.onnx"] = sha256(other / "model.onnx")  # the hash "fixed" by hand
    (other / "manifest.json").write_text(json.dumps(raw))
    line = error_line(run_cpp(cpp, "generate", other, "--prompt", "Hi", ok=False))
    assert "the graph has no input 'attention_mask' that manifest.json lists" in line
    limit = Manifest.load(good).max_context
    line = error_line(run_cpp(cpp, "generate", good, "--prompt", "word " * limit, "--max-new-tokens", 8, ok=False))
    assert f"the context limit {limit} leaves room for {limit - 8} (--truncate keeps the last ones)" in line
    truncated = cpp_generate(cpp, good, "--prompt", "word " * (limit - 200), "--max-new-tokens", 300, "--truncate")
    assert truncated["stats"]["prompt_tokens"] == limit - 300
    # where both runtimes validate, one message (runtime/request.py's); True: the Python CLI's line, word for word
    for args, says, same in (
            (["--prompt", "Hi", "--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0", True),
            (["--prompt", "Hi", "--top-p", "0.5"], "--top-p 0.5 applies to sampling", True),
            (["--prompt", "Hi", "--top-k", "3"], "--top-k 3 applies to sampling", True),
            (["--prompt", "Hi", "--temperature", "1", "--top-p", "1.5"], "--top-p 1.5: expected a number in (0, 1]", True),
            (["--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1", True),
            (["--prompt", "Hi", "--seed", "-1"], "--seed -1: expected an integer in [0, 2**64)", True),
            (["--prompt", "Hi", "--stop", ""], "--stop: expected a non-empty string", True),
            (["--prompt", "Hi", "--repetition-penalty", "0"], "--repetition-penalty 0.0: expected a finite number > 0",
             True),
            (["--prompt", "Hi", "--temperature", "x"], "argument --temperature: expected a number, got 'x'", True),
            (["--ids", "1,x"], "argument --ids: expected comma-separated integers", True),
            (["--ids", "99999999"], "--ids: expected a non-empty list of token ids in [0, 32000)", True),
            (["--raw", "--ids", "1"], "--raw goes with --prompt", True),
            (["--prompt", "word " * (2 * limit + 10), "--max-new-tokens", str(limit // 4), "--truncate"],
             "do not fit the context limit at all: shorten the prompt", True),
            (["--prompt", "Hi", "--ids", "1"], "give one of them", False),
            (["--prompt", b"\xff".decode("utf-8", "surrogateescape")], "--prompt: not valid UTF-8", False),
            (["--messages", tmp_path / "none.json"], "none.json: missing", True)):
        r = subprocess.run([str(cpp / "mistral-trt-cpp"), "generate", str(good)] + [
            a if isinstance(a, str) else str(a) for a in args], capture_output=True, timeout=120)
        r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode("utf-8", "replace"))
        assert says in error_line(r), (args, r.stderr)
        if same:
            capsys.readouterr()
            rc, _, py = cli(capsys, "generate", good, *args)
            assert rc == 2 and error_line(r).split(": error: ", 1)[1] == py.split(": error: ", 1)[1], (args, py)


def test_empty_tokenizer_vocabulary_is_refused(cpp, tmp_path):
    """A tokenizer.json whose vocabulary is empty is refused when loaded (it used to load, and --ids then ran)."""
    tj = tmp_path / "tokenizer.json"
    tj.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type": "ByteLevel"}}))
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    line = error_line(run_cpp(cpp, "tokenize", "--tokenizer", tj, "--messages", conv, ok=False))
    assert f"{tj}: the model vocabulary is empty" in line


# Chat templates as checkpoints ship them, each exercising other parts of Jinja: the demo's ChatML; Zephyr's (newlines
# that trim_blocks drops, elif, loop.last); Llama 2's (slices, set, raise_exception, %, .strip()); Mistral's HF template
# ({%- -%} whitespace control, `is defined`, loop.first); a namespace() one (lstrip_blocks on indented tags, `| trim`,
# a loop's `if` filter, `~`).
TEMPLATES = {
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
              "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
              "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
              "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
              "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
              "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
              "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
              "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
              "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    "mistral": "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
               "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n"
               "{{- bos_token }}\n{%- for message in loop_messages %}\n"
               "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
               "        {{- raise_exception('After the optional system message, conversation roles must alternate') }}\n"
               "    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n"
               "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n"
               "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
               "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n"
               "        {{- raise_exception('Only user and assistant roles are supported') }}\n    {%- endif %}\n{%- endfor %}\n",
    "namespace": "{% set ns = namespace(system='', turns=0) %}\n{% for m in messages if m['role'] == 'system' %}\n"
                 "    {% set ns.system = ns.system ~ m['content'] | trim %}\n{% endfor %}\n"
                 "{% if ns.system %}<|im_start|>system\n{{ ns.system }}<|im_end|>\n{% endif %}\n"
                 "{% for m in messages if m['role'] != 'system' %}\n    {% set ns.turns = ns.turns + 1 %}\n"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}\n"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi  there\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c 😀 你好 I'm 42"}],
    [{"role": "user", "content": "  tabs\tand\n\nlines  "}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "don't, we'll, 3.14159, ½ café — “quoted”"}],
]


@pytest.mark.parametrize("name", ["demo", *TEMPLATES])
def test_template_chat_formats_equal_transformers(cpp, demo_hf, tmp_path, name):
    """`mistral-trt-cpp tokenize` with a chat template (cpp/src/jinja.cpp renders it, the byte-level BPE encodes it):
    token for token transformers' apply_chat_template on the same tokenizer, for each template and conversation."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo_hf / f).is_file():
            shutil.copy(demo_hf / f, folder / f)
    template = (demo_hf / "chat_template.jinja").read_text() if name == "demo" else TEMPLATES[name]
    (folder / "chat_template.jinja").write_text(template)
    hf = AutoTokenizer.from_pretrained(folder)
    checked = 0
    for i, conv in enumerate(CONVERSATIONS):
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(conv))
        want = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        got = json.loads(run_cpp(cpp, "tokenize", "--tokenizer", folder / "tokenizer.json", "--messages", path,
                                 "--format", "template").stdout)["ids"]
        # tokenize shows a conversation ready for its reply; the generation prompt is the template's to add
        assert got == want, (name, conv)
        checked += 1
    assert checked == len(CONVERSATIONS)
    if name in ("llama2", "mistral"):  # raise_exception: the template's own words, one line, exit 2
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]))
        line = error_line(run_cpp(cpp, "tokenize", "--tokenizer", folder / "tokenizer.json", "--messages", path,
                                  "--format", "template", ok=False))
        assert "chat template: " in line and "alternate" in line


@pytest.mark.slow
def test_cpp_generates_from_a_prompt_on_the_demo(cpp, demo_fused, capsys):
    """README's `mistral-trt-cpp generate EXPORT --prompt ...` on the demo (a chat template, a byte-level BPE): the
    Python runtime's prompt ids and greedy reply."""
    args = ["--prompt", "Name three planets.", "--max-new-tokens", "24"]
    got = cpp_generate(cpp, demo_fused, *args)
    rc, out, _ = cli(capsys, "generate", demo_fused, *args, "--json", "--speculate", "off")
    want = json.loads(out)
    assert rc == 0 and got["prompt_ids"] == want["prompt_ids"] and got["ids"] == want["ids"] and got["text"] == want["text"]


# -- the C ABI: ctypes (Python embedding) and the C example --------------------------------------------------
@pytest.mark.skipif(SANITIZED, reason="a sanitized library loads only into a sanitized process (the C example covers it)")
def test_c_abi_from_python_ctypes(cpp, tiny_exports, capsys):
    """The C ABI from Python (mistral_trt/bench/cpp.py's ctypes declarations): errors as strings, the id buffer
    protocol, the per-token callback, stats and timestamps; the Python runtime's greedy reply."""
    from mistral_trt.bench.cpp import ON_TOKEN, Params, Stats, load_library

    lib = load_library(cpp / "libmistral_trt.so")
    assert lib.mtrt_open(str(tiny_exports["full", "fp32"] / "missing").encode()) is None
    assert b"no manifest" in lib.mtrt_last_error()
    m = lib.mtrt_open(str(tiny_exports["full", "fp32"]).encode())
    assert m, lib.mtrt_last_error()
    try:
        assert lib.mtrt_info(m, b"vocab_size") == 32000 and lib.mtrt_info(m, b"nothing") == -1
        ids, n = (ctypes.c_int64 * 2)(), ctypes.c_size_t()
        assert lib.mtrt_tokenize(m, 0, "Tell me a story".encode(), ids, 2, ctypes.byref(n)) == 3  # too small
        buf = (ctypes.c_int64 * n.value)()
        assert lib.mtrt_tokenize(m, 0, "Tell me a story".encode(), buf, n.value, ctypes.byref(n)) == 0
        pieces, got = [], []

        @ON_TOKEN
        def on_token(user, tid, text, size):
            if tid >= 0:
                got.append(tid)
            pieces.append(ctypes.string_at(text, size).decode())
            return 0

        p, st = Params(), Stats()
        lib.mtrt_default_params(ctypes.byref(p))
        p.max_new_tokens = 12
        times = (ctypes.c_double * 12)()
        assert lib.mtrt_generate(m, buf, n.value, ctypes.byref(p), on_token, None, ctypes.byref(st), times) == 0
        want = py_generate(capsys, tiny_exports["full", "fp32"], "--prompt", "Tell me a story", "--max-new-tokens", 12)
        assert list(buf) == want["prompt_ids"] and got == want["ids"] and "".join(pieces) == want["text"]
        assert st.new_tokens >= len(got) and st.prompt_tokens == n.value and 0 < times[0] <= times[len(got) - 1]
        p.temperature = -1.0
        assert lib.mtrt_generate(m, buf, n.value, ctypes.byref(p), on_token, None, None, None) == 2
        assert lib.mtrt_last_error() == b"temperature -1.0: expected a finite number >= 0 (0: greedy)"
    finally:
        lib.mtrt_close(m)


def test_c_embedding_example(cpp, tiny_exports, capsys):
    """examples/embed.c, the program docs/cpp.md shows: it streams the same greedy reply."""
    folder = tiny_exports["full", "fp32"]
    r = subprocess.run([str(cpp / "embed"), str(folder), "Tell me a story"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = py_generate(capsys, folder, "--prompt", "Tell me a story", "--max-new-tokens", 32)
    assert r.stdout.split("\n[")[0] == want["text"] and "tokens/s]" in r.stdout
    r = subprocess.run([str(cpp / "embed"), str(folder / "nothing"), "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "no manifest" in r.stderr and r.stderr.count("\n") == 1


def test_remembered_hashes_are_shared_with_python(cpp, tiny_exports, tmp_path):
    """Both runtimes remember a verified file's hash under the same record (runtime/integrity.py): after the C++
    runtime has hashed a fresh copy, the Python runtime's lookup finds it."""
    from mistral_trt.runtime import integrity

    folder = shutil.copytree(tiny_exports["full", "fp32"], tmp_path / "copy")
    st = (folder / "model.onnx").stat()
    assert integrity._remembered(st) is None
    cpp_generate(cpp, folder, "--prompt", "Hi", "--max-new-tokens", 2)
    assert integrity._remembered(st) == Manifest.load(folder).files["model.onnx"]
    np.testing.assert_equal(integrity.sha256(folder / "model.onnx"), Manifest.load(folder).files["model.onnx"])


@pytest.mark.skipif(not os.environ.get("MISTRAL_TRT_VALGRIND"), reason="valgrind runs in `make cpp-asan` (a minute)")
def test_valgrind_memcheck_one_short_generation(tiny_exports):
    """valgrind's memcheck on the plain build's C example, one short generation: zero errors, nothing definitely
    lost. cpp/valgrind.supp suppresses only what onnxruntime's own library does (a self-memcpy at session start)."""
    plain = ROOT / "build" / "cpp"
    r = subprocess.run(["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
                        f"--suppressions={ROOT / 'cpp' / 'valgrind.supp'}", str(plain / "embed"),
                        str(tiny_exports["full", "fp32"]), "Hi"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in r.stderr and "definitely lost: 0 bytes" in r.stderr


@pytest.mark.skipif(SANITIZED, reason="a sanitized library loads only into a sanitized process")
def test_bench_runs_the_cpp_runtime_beside_the_python_one(cpp, tiny_fused, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", str(tiny_fused["full"]), "--cpp", "--cpp-lib", str(cpp / "libmistral_trt.so"), "--prompt-len",
                 "16,40", "--gen-len", "6", "--warmup", "0", "--repeat", "2", "-o", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    systems = {r["system"] for r in rows}
    name = tiny_fused["full"].name  # a system is named by its folder
    assert systems == {f"ours:{name}", f"cpp:{name}"} and len(rows) == 4
    cpp_rows = [r for r in rows if r["system"].startswith("cpp:")]
    assert all(r["decode_ms"]["n"] == 2 * 5 and r["ttft_ms"] > 0 and "ours_speedup_decode" in r for r in cpp_rows)
    assert main(["bench", str(tiny_fused["full"]), "--cpp", "--batch", "2", "-o", str(tmp_path / "b2")]) == 2


# -- sessions: the KV cache kept between turns ----------------------------------------------------------------
def fed_prefix(prev: dict, prompt: list[int]) -> int:
    """Prompt tokens a session's cache holds after `prev` (a generate --json result): its prompt and the reply
    tokens fed back (all of them after EOS; all but the last sampled one at max_new_tokens), as far as `prompt`
    begins the same way, and never its last token."""
    eos = prev["stats"]["new_tokens"] > len(prev["ids"])  # EOS was sampled (it is not in ids)
    fed = prev["prompt_ids"] + (prev["ids"] if eos else prev["ids"][:-1])
    n = 0
    while n < min(len(fed), len(prompt) - 1) and fed[n] == prompt[n]:
        n += 1
    return n


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_c_session_example_keeps_the_cache_between_turns(cpp, model, tiny_fused, demo_fused, tmp_path, capsys):
    """examples/chat.c (run under ASan by `make cpp-asan`): three turns through one session. Each reply equals the
    Python runtime's fresh run of the whole conversation so far (replies put back as assistant messages), and each
    turn's cached tokens are exactly what the cache held of its prompt (computed from the Python ids)."""
    import re

    folder = tiny_fused["full"] if model == "tiny" else demo_fused
    turns = ["Tell me a story about the sea.", "Make it shorter, and sadder ✓", "Thanks!"]
    r = subprocess.run([str(cpp / "chat"), str(folder), *turns], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-3000:]
    blocks = re.findall(r"> (.*?)\n(.*?)\n\[(\d+) prompt tokens, (\d+) from the cache, (\d+) new", r.stdout, re.S)
    assert [b[0] for b in blocks] == turns, r.stdout
    history, prev = [], None
    for k, (message, reply, prompt_tokens, cached, _new) in enumerate(blocks):
        history.append({"role": "user", "content": message})
        conv = tmp_path / f"conv{k}.json"
        conv.write_text(json.dumps(history))
        want = py_generate(capsys, folder, "--messages", conv, "--max-new-tokens", 24)
        assert reply == want["text"] and int(prompt_tokens) == len(want["prompt_ids"])
        expect = 0 if prev is None else fed_prefix(prev, want["prompt_ids"])
        assert int(cached) == expect and (k == 0 or expect >= len(prev["prompt_ids"]) - 1), (k, cached, expect)
        history.append({"role": "assistant", "content": reply})
        prev = want


@pytest.mark.skipif(SANITIZED, reason="a sanitized library loads only into a sanitized process (the C example covers it)")
def test_c_session_ids_reset_portable_and_bad_calls(cpp, tiny_fused, tiny_exports):
    """The session calls from ctypes: ids appended turn by turn give mtrt_generate's reply to the whole ids from a
    fresh cache, feeding only what is new; reset starts cold; the portable graph keeps nothing (cached 0) and
    answers the same; misuse is a status 2 with one line."""
    from mistral_trt.bench.cpp import ON_TOKEN, Params, Stats, load_library

    lib = load_library(cpp / "libmistral_trt.so")
    p = Params()
    lib.mtrt_default_params(ctypes.byref(p))
    p.max_new_tokens = 10

    def fresh(m, ids):
        got = []
        cb = ON_TOKEN(lambda user, tid, text, size: (got.append(tid) if tid >= 0 else None) or 0)
        arr = (ctypes.c_int64 * len(ids))(*ids)
        assert lib.mtrt_generate(m, arr, len(ids), ctypes.byref(p), cb, None, None, None) == 0, lib.mtrt_last_error()
        return got

    def turn(s, ids):
        got, st = [], Stats()
        cb = ON_TOKEN(lambda user, tid, text, size: (got.append(tid) if tid >= 0 else None) or 0)
        arr = (ctypes.c_int64 * len(ids))(*ids)
        assert lib.mtrt_session_append_ids(s, arr, len(ids)) == 0, lib.mtrt_last_error()
        assert lib.mtrt_session_generate(s, ctypes.byref(p), cb, None, ctypes.byref(st), None) == 0, lib.mtrt_last_error()
        return got, st

    first, second = [1, 733, 16289, 28793, 22557, 528], [733, 16289, 28793, 7663, 28723]
    for folder, keeps in ((tiny_fused["full"], True), (tiny_exports["full", "fp32"], False)):
        m = lib.mtrt_open(str(folder).encode())
        s = lib.mtrt_session_open(m)
        assert m and s, lib.mtrt_last_error()
        try:
            got1, st1 = turn(s, first)
            assert got1 == fresh(m, first) and st1.cached_tokens == 0 and st1.prompt_tokens == len(first)
            whole = first + got1 + second
            got2, st2 = turn(s, second)
            assert got2 == fresh(m, whole) and st2.prompt_tokens == len(whole)
            fed = len(first) + len(got1) - (st1.stop_reason == 0)
            assert st2.cached_tokens == (fed if keeps else 0)
            assert lib.mtrt_session_append(s, b"user", b"Hi") == 2
            assert b"this session holds ids" in lib.mtrt_last_error()
            assert lib.mtrt_session_reset(s) == 0
            got3, st3 = turn(s, first)
            assert got3 == got1 and st3.cached_tokens == 0
            assert lib.mtrt_session_reset(s) == 0
            assert lib.mtrt_session_generate(s, ctypes.byref(p), ON_TOKEN(), None, None, None) == 2
            assert lib.mtrt_last_error() == b"mtrt_session_generate: the session is empty; append a message or ids first"
            assert lib.mtrt_session_append(s, b"robot", b"Hi") == 2 and b"role 'robot'" in lib.mtrt_last_error()
            bad = (ctypes.c_int64 * 1)(32000)
            assert lib.mtrt_session_append_ids(s, bad, 1) == 2 and b"[0, 32000)" in lib.mtrt_last_error()
            assert lib.mtrt_session_append(None, b"user", b"Hi") == 2
        finally:
            lib.mtrt_session_close(s)
            lib.mtrt_close(m)
