"""`mistral-trt <command>`: the one entry point. Each command imports only what it needs, so the
runtime commands work on a runtime-only install (no torch)."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from mistral_trt.runtime.errors import Terminated, UserError, check_interrupted, interrupted, on_signal, read_json
from mistral_trt.serve.limits import Limits


def cmd_convert_gguf(a):
    from mistral_trt.export.gguf_convert import DEMO_NAME, convert_gguf, default_gguf

    src = a.gguf or default_gguf()
    out = convert_gguf(src, a.output or f"build/{DEMO_NAME}", force=a.force)
    print(out)


# Which precisions read each precision-specific flag of `export` and `quantize`: given for a precision that does not
# read it, a flag is refused by name, never accepted and ignored (None: the float export without --precision).
PRECISION_FLAGS = {
    "--block-size": {"int8-w8a8-dynamic", "int4", "int4-w4a16"},
    "--lm-head-bits": {"int4", "int4-w4a16"},
    "--calib-method": {"int8-w8a8"},
    "--smoothquant-alpha": {"int8-w8a8"},
    "--outlier-ratio": {"int8-w8a8"},
}


def _refuse_unread(a, precision: str | None) -> None:
    for flag, reads in PRECISION_FLAGS.items():
        if flag in a.given and precision not in reads:
            raise UserError(f"{flag} goes with --precision {' or '.join(sorted(reads))}, not "
                            f"{precision or 'a float export (no --precision)'}")


def cmd_export(a):
    from mistral_trt.export.pipeline import export_model

    _refuse_unread(a, a.precision)  # --int4-method: its own check below (it also needs --calib)

    calibrate = None
    if a.precision == "int8-w8a8":  # calibrated on the checkpoint, one decoder layer at a time
        from mistral_trt.calib.quantize import CheckpointW8a8

        calibrate = CheckpointW8a8(a.calib, a.calib_method, _alpha_value(a), a.outlier_ratio)
    elif a.precision in ("int4", "int4-w4a16") and a.calib:  # --int4-method (auto: by the model's size), likewise
        from mistral_trt.calib.quantize import CheckpointInt4

        calibrate = CheckpointInt4(a.calib, a.int4_method or "auto")
    elif a.calib:
        from mistral_trt.export.pipeline import CALIB_MESSAGE

        raise UserError(CALIB_MESSAGE)
    if a.int4_method and not (a.precision in ("int4", "int4-w4a16") and a.calib):
        raise UserError(f"--int4-method {a.int4_method} chooses how calibrated int4 rounds: it needs --precision int4 "
                        "or int4-w4a16 and --calib CALIB")
    export_model(a.model, a.output, dtype=a.dtype, force=a.force, run_verify=not a.no_verify,
                 max_window_check=a.max_window_check, provider=a.provider, graph=a.graph, precision=a.precision,
                 block_size=a.block_size, calibrate=calibrate, lm_head_bits=a.lm_head_bits)


def _alpha_value(a):
    return a.smoothquant_alpha if a.smoothquant_alpha == "auto" else float(a.smoothquant_alpha)


def cmd_verify(a):
    from mistral_trt.export.pipeline import verify_export

    verify_export(a.export_dir, a.model, max_window_check=a.max_window_check, provider=a.provider)


def cmd_tokenize(a):
    import json
    from pathlib import Path

    from mistral_trt.runtime.chat import format_chat
    from mistral_trt.runtime.manifest import Manifest
    from mistral_trt.runtime.tokenizer import Tokenizer

    if bool(a.export_dir) == bool(a.tokenizer):
        raise UserError("give an export folder EXPORT_DIR or --tokenizer FILE (one of them)")
    if a.export_dir:
        m = Manifest.load(a.export_dir)
        m.check_files(a.export_dir, names=m.tokenizer_files)
        tok, fmt, template = Tokenizer.for_export(a.export_dir, m), m.chat_format, m.chat_template
    else:
        tok = Tokenizer.load(a.tokenizer)
        here = Path(a.tokenizer).parent
        template = None
        if (here / "chat_template.jinja").is_file():
            template = (here / "chat_template.jinja").read_text(encoding="utf-8")
        elif (here / "tokenizer_config.json").is_file():
            template = read_json(here / "tokenizer_config.json").get("chat_template")
        fmt = "mistral-v1" if tok.kind == "sentencepiece" else "template"
    fmt = a.format or fmt
    messages = read_json(a.messages)
    ids = format_chat(tok, messages, fmt, template, complete=True)  # a finished last reply: the training form
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))


def _load_runtime(folder, provider="cpu"):
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.generate import Generator

    return Generator(open_backend(folder, provider))  # checks the files against the manifest's sha256


def _load_tokenizer(folder):
    from mistral_trt.runtime.manifest import Manifest
    from mistral_trt.runtime.tokenizer import Tokenizer

    m = Manifest.load(folder)
    m.check_files(folder, names=m.tokenizer_files)
    return m, Tokenizer.for_export(folder, m)


def _grammar(a):
    """--json-schema FILE, --regex R or --grammar FILE (GBNF or Lark): what the reply must match (one of them)."""
    import json
    from pathlib import Path

    from mistral_trt.runtime.structured import Grammar

    given = [(flag, v) for flag, v in (("--json-schema", a.json_schema), ("--regex", a.regex),
                                       ("--grammar", a.grammar)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{given[0][0]} and {given[1][0]}: give one constraint")
    if not given:
        return None
    flag, value = given[0]
    if flag == "--regex":
        return Grammar("regex", value, flag)
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {value}: cannot read it ({e.strerror if isinstance(e, OSError) else e})") from None
    if flag == "--grammar":
        return Grammar("grammar", text, f"{flag} {value}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {value}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UserError(f"{flag} {value}: expected a JSON schema (an object)")
    return Grammar("json_schema", json.dumps(schema, sort_keys=True), f"{flag} {value}")


def _request_params(a) -> dict:
    """The sampling and stop flags as runtime/request.py's fields (None: not given). `--greedy` is the default
    spelled out, so it only contradicts a temperature above 0."""
    if a.greedy and (a.temperature or 0) > 0:
        raise UserError(f"--greedy and --temperature {a.temperature:g} contradict each other; give one")
    return {"grammar": _grammar(a), "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "min_p": a.min_p,
            "repetition_penalty": a.repetition_penalty, "frequency_penalty": a.frequency_penalty,
            "presence_penalty": a.presence_penalty, "seed": a.seed, "stop": a.stop or None,
            "max_tokens": a.max_new_tokens, "truncate": a.truncate}


def _build(params: dict, tok, m):
    from mistral_trt.runtime.request import CLI, CLI_DEFAULTS, build_request

    return build_request(params, tok, m, m.max_context, CLI, CLI_DEFAULTS)


def _stream(gen, tok, req, a, out, session=None):
    """Run one request, writing its text as it comes (runtime/sequence.py holds back what may begin a stop string,
    so what is written is exactly what --json returns); returns (new ids, text, final stats, the Speculation that
    ran or None). `session` (chat): a runtime/session.py Session whose cache the request starts from."""
    from mistral_trt.runtime.speculative import auto_speculation, exactness_note

    speculate = a.speculate
    if speculate == "auto":  # on where it is lossless and measured faster (auto_speculation), else plain decoding
        speculate = auto_speculation(gen, len(req.prompt), req.max_tokens)
    elif speculate is not None:
        note = exactness_note(gen.backend.manifest)
        if note:
            print(note, file=sys.stderr)
    ids, text = [], []
    updates = session.run(req, tok, speculate) if session is not None else (u for (u,) in gen.run([req], tok, speculate))
    for u in updates:
        if u is None or u.output is None:
            continue
        ids += u.output.token_ids
        text.append(u.output.text)
        if out and u.output.text:
            out.write(u.output.text)
            out.flush()
        if u.output.finish_reason:
            return ids, "".join(text), u.output.stats, speculate
    raise AssertionError("the sequence ended without a final output")  # Generator.run always ends with one


def cmd_generate(a):
    import json

    params = _request_params(a) | {"text": a.prompt, "raw": a.raw or None, "ids": a.ids,
                                   "messages": read_json(a.messages) if a.messages else None}
    m, tok = _load_tokenizer(a.export_dir)
    req = _build(params, tok, m)  # a bad request fails before the model loads
    gen = _load_runtime(a.export_dir, a.provider)
    ids, text, stats, speculated = _stream(gen, tok, req, a, None if a.json else sys.stdout)
    if a.json:
        st = stats.as_dict()
        if speculated:
            st["speculation"] = {"k": speculated.k, "drafted": stats.drafted, "accepted": stats.accepted}
        print(json.dumps({"prompt_ids": req.prompt.tolist(), "ids": ids, "text": text, "stats": st},
                         ensure_ascii=False))
    else:
        print()
        st = stats.as_dict()
        drafts = f", speculative: {stats.accepted} of {stats.drafted} drafted tokens kept" if speculated else ""
        print(f"[{st['prompt_tokens']} prompt tokens, {st['new_tokens']} new, first token after "
              f"{st['time_to_first_token_s'] * 1000:.0f} ms, {st['decode_tokens_per_s']:.1f} tokens/s{drafts}]",
              file=sys.stderr)


def _read_line(prompt: str) -> str | None:
    """One line of stdin; None at its end. A closed stdin or bytes that are not UTF-8 get one line."""
    from mistral_trt.runtime.tokenizer import check_text

    if sys.stdin is None or sys.stdin.closed:
        raise UserError("stdin is closed: type messages on a terminal, pipe them in, or pass --say TEXT")
    try:
        return check_text(input(prompt), "stdin")
    except EOFError:
        return None
    except UnicodeDecodeError as e:
        raise UserError(f"stdin: not valid UTF-8 (byte 0x{e.object[e.start:e.start + 1].hex()})") from None


def cmd_chat(a):
    from mistral_trt.runtime.chat import check_messages
    from mistral_trt.runtime.request import CLI, build_prompt
    from mistral_trt.runtime.tokenizer import check_text

    for flag, text in (("--system", a.system), ("--say", a.say)):
        if text is not None:
            check_text(text, flag)
    history = [{"role": "system", "content": a.system}] if a.system else []
    if a.messages:  # an earlier conversation to go on with
        history += check_messages(read_json(a.messages))
    m, tok = _load_tokenizer(a.export_dir)
    flags = _request_params(a)
    _build(flags | {"text": "x"}, tok, m)  # the flags' own errors, before the model loads
    gen = _load_runtime(a.export_dir, a.provider)
    from mistral_trt.runtime.session import Session

    session = Session(gen)  # each turn is fed from where it differs from what the cache holds: the new messages

    def reply():
        prompt = build_prompt({"messages": history}, tok, m, CLI)
        while len(prompt) + a.max_new_tokens > gen.max_context and len(history) > 2:
            first = 1 if history[0]["role"] == "system" else 0  # keep the system prompt
            del history[first:first + 2]  # drop the oldest exchange
            prompt = build_prompt({"messages": history}, tok, m, CLI)
        prefix = history.pop()["content"] if history[-1].get("prefix") else ""  # a reply to continue
        if prefix:
            print(prefix, end="", flush=True)
        _, text, _, _ = _stream(gen, tok, _build(flags | {"ids": prompt}, tok, m), a, sys.stdout, session)
        print()
        history.append({"role": "assistant", "content": (prefix + text).strip() or " "})

    if history and (history[-1]["role"] == "user" or history[-1].get("prefix")):
        reply()
    inputs = [a.say] if a.say else None
    while True:
        if inputs is not None:
            if not inputs:
                return
            line = inputs.pop(0)
            print(f"> {line}")
        else:
            line = _read_line("> ")
            if line is None:
                return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply()


def cmd_bench(a):
    from mistral_trt.bench.latency import main_bench

    main_bench(a)


def cmd_serve(a):
    from mistral_trt.serve.access import load_keys
    from mistral_trt.serve.server import serve

    if a.no_prefix_cache and a.prefix_cache_mib is not None:
        raise UserError("--prefix-cache-mib sizes the prefix cache that --no-prefix-cache turns off: give one of them")
    limits = Limits(max_body_bytes=a.max_body_bytes, header_timeout=a.header_timeout, read_timeout=a.read_timeout,
                    request_timeout=a.request_timeout, default_max_tokens=a.default_max_tokens,
                    max_connections=a.max_connections)
    serve(a.export_dir, host=a.host, port=a.port, max_batch=a.max_batch, max_queue=a.max_queue,
          keys=load_keys(a.api_key, a.api_key_file), protect_metrics=a.protect_metrics,
          allowed_origins=tuple(a.allowed_origins or ()), ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile,
          model_name=a.model_name, safe_prompt=a.safe_prompt, max_context=a.max_context, prefill_chunk=a.prefill_chunk,
          itl_slack=a.itl_slack, provider=a.provider, shutdown_timeout=a.shutdown_timeout, speculate=a.speculate,
          limits=limits, log_prompts=a.log_prompts, prefix_cache=not a.no_prefix_cache,
          prefix_cache_mib=a.prefix_cache_mib)


def cmd_bench_speculate(a):
    from mistral_trt.bench.speculative import main_bench_speculate

    main_bench_speculate(a)


def cmd_triton_repo(a):
    from mistral_trt.export.triton import write_repo

    model = write_repo(a.export_dir, a.output, name=a.name, instances=a.instances, max_batch=a.max_batch,
                       max_queue=a.max_queue, max_context=a.max_context, provider=a.provider, force=a.force,
                       speculate=a.speculate)
    print(model)


def cmd_triton_serve(a):
    from mistral_trt.serve.triton import serve_repo

    serve_repo(a.repo, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
               log_verbose=a.log_verbose)


def cmd_bench_serve(a):
    from mistral_trt.bench.serving import main_bench_serve

    main_bench_serve(a)


def cmd_bench_structured(a):
    from mistral_trt.bench.structured import main_bench_structured

    main_bench_structured(a)


def _users_turns(text: str) -> tuple[int, int]:
    users, _, turns = text.partition("x")
    if not (users.isdigit() and turns.isdigit() and int(users) >= 1 and int(turns) >= 2):
        raise argparse.ArgumentTypeError(f"expected USERSxTURNS with USERS >= 1 and TURNS >= 2, e.g. 8x4, got {text!r}")
    return int(users), int(turns)


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, e.g. 32-1024, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def cmd_calibrate(a):
    from pathlib import Path

    from mistral_trt.calib.data import build
    from mistral_trt.export.atomic import atomic_folder

    with atomic_folder(a.output, a.force, kind="calibration", inputs=[a.export_dir]) as tmp:
        m = build(a.export_dir, Path(tmp), count=a.count, reply_tokens=a.reply_tokens)
    print(f"{a.output}: {m['count']} sequences, {m['tokens']['total']} tokens, eval text {m['eval']['tokens']} tokens, "
          f"held-out chat {m['eval_chat']['tokens']} tokens, "
          f"sha256 {m['sha256'][:16]}")


def cmd_quantize(a):
    from mistral_trt.calib.quantize import quantize

    if a.calib and a.precision in ("int4", "int4-w4a16"):  # quantize rounds to nearest; calibrated int4 needs the model
        raise UserError(f"--calib with --precision {a.precision}: calibrated int4 (AWQ + GPTQ) is written from the "
                        f"checkpoint, layer by layer: mistral-trt export CHECKPOINT -o OUT --graph "
                        f"{'fused' if a.precision == 'int4' else 'portable'} --precision {a.precision} --calib CALIB_DIR")
    if a.calib and a.precision != "int8-w8a8":
        raise UserError(f"--calib goes with --precision int8-w8a8 (SmoothQuant), not {a.precision}")
    _refuse_unread(a, a.precision)

    m = quantize(a.export_dir, a.precision, a.output, force=a.force, calib=a.calib, calib_method=a.calib_method,
                 alpha=_alpha_value(a), outlier_ratio=a.outlier_ratio, block_size=a.block_size,
                 lm_head_bits=a.lm_head_bits)
    print(f"{a.output}: {m.precision['name']} ({m.precision['method']})")


def cmd_engine(a):
    from mistral_trt.export.tensorrt import build_engine

    build_engine(a.export_dir, a.output, max_batch=a.max_batch, max_step_tokens=a.max_step_tokens, max_context=a.max_context,
                 timing_cache=a.timing_cache, workspace_gib=a.workspace_gib, force=a.force)


def cmd_eval(a):
    from mistral_trt.calib.evaluate import main_eval

    main_eval(a)


def _alpha(text: str) -> str:
    if text != "auto":
        try:
            if not 0.0 <= float(text) <= 1.0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {text!r}") from None
    return text


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parsed(kind):
    """An argparse type that only parses a number: its range is runtime/request.py's rule, checked with the rest
    of the request, so the CLI, the HTTP API and Triton give one message."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _count(low: int = 1, high: int | None = None):
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


def _seconds_or_off(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _positive(text)


def _origin(text: str) -> str:
    import re

    if text != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", text):
        raise argparse.ArgumentTypeError(f"expected an origin such as https://app.example.com (scheme://host[:port], "
                                         f"no path) or *, got {text!r}")
    return text


def _add_sampling_args(s):
    s.add_argument("--max-new-tokens", type=_parsed(int), default=128,
                   help="at most this many new tokens (prompt + new tokens must fit the context limit)")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --temperature)")
    s.add_argument("--temperature", type=_parsed(float), help="sample at this temperature (> 0); 0 means greedy")
    s.add_argument("--top-p", type=_parsed(float), help="nucleus sampling, (0, 1] (1: off; needs --temperature)")
    s.add_argument("--top-k", type=_parsed(int), help="sample among the k most likely (0: off; needs --temperature)")
    s.add_argument("--min-p", type=_parsed(float), help="drop tokens less likely than MIN_P x the most likely one, "
                   "[0, 1] (0: off)")
    s.add_argument("--repetition-penalty", type=_parsed(float), help="> 0; 1 is off (HF's rule)")
    g = s.add_argument_group("structured output (one of them; the reply must match it)")
    g.add_argument("--json-schema", metavar="FILE", help="a JSON schema")
    g.add_argument("--regex", metavar="R", help="a regular expression")
    g.add_argument("--grammar", metavar="FILE", help="a grammar: GBNF (llama.cpp's) or Lark")
    s.add_argument("--frequency-penalty", type=_parsed(float), help="in [-2, 2]; 0 is off (OpenAI's rule, over the "
                   "generated tokens)")
    s.add_argument("--presence-penalty", type=_parsed(float), help="in [-2, 2]; 0 is off (OpenAI's rule)")
    s.add_argument("--seed", type=_parsed(int))
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not included in the output)")
    s.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt over the context limit (at least half of the prompt, else refuse)")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="onnxruntime execution provider")
    s.add_argument("--speculate", type=_speculation_or_auto, default="auto", metavar="auto|off|ngram[:K]",
                   help="speculative decoding with prompt-lookup drafts, up to K tokens a step (default 7; 2n + 1 after "
                   "a match of n tokens, 0 / 2 / 6 on int8 and int4 exports; fused graph): the same output, faster "
                   "where the reply quotes its input. auto (the default): ngram where it is lossless and measured "
                   "faster (a fused fp32 export on the CPU provider), else off")


def _speculation_or_auto(text: str):
    """generate's and chat's --speculate: `auto` stays "auto" (resolved per request: auto_speculation), `off` ->
    None, ngram[:K] -> Speculation."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return _speculation(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(str(e).replace("expected ngram", "expected auto, off, ngram")) from None


def _speculation(text: str):
    from mistral_trt.runtime.speculative import Speculation

    try:
        return Speculation.parse(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _add_w8a8_args(s):
    s.add_argument("--calib", metavar="CALIB_DIR", help="calibration folder (int8-w8a8 calibrates its activations on it)")
    s.add_argument("--calib-method", choices=["max", "percentile", "mse"], default="max",
                   help="int8-w8a8 activation range: max (default, measured best), 99.99th percentile, or MSE-optimal clip")
    s.add_argument("--smoothquant-alpha", default="auto", type=_alpha,
                   help="int8-w8a8 SmoothQuant migration strength 0..1, or auto (per activation, by output error)")
    s.add_argument("--outlier-ratio", type=float, default=20.0,
                   help="int8-w8a8: activations whose max exceeds this many times their 99.99th percentile stay float")


class Parser(argparse.ArgumentParser):
    """Bad arguments get one line and exit code 2, like every other bad input (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    from mistral_trt.calib.quantize import INT4_METHODS, PRECISIONS  # constants (numpy at import, no torch)
    from mistral_trt.export.verify import MAX_WINDOW_CHECK  # a constant; verify.py imports numpy only at top
    from mistral_trt.runtime.manifest import EXPORT_PRECISIONS, GRAPHS

    p = Parser(prog="mistral-trt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("convert-gguf", help="llama-architecture GGUF -> Hugging Face folder (MistralForCausalLM)")
    s.add_argument("gguf", nargs="?", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("-o", "--output", metavar="CHECKPOINT", help="output folder (default: build/smollm2-135m-instruct)")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_convert_gguf)

    s = sub.add_parser("export", help="Hugging Face checkpoint -> ONNX with KV cache + manifest.json, verified")
    s.add_argument("model", metavar="CHECKPOINT", help="Hugging Face checkpoint folder (or a hub id where the hub is reachable)")
    s.add_argument("-o", "--output", metavar="EXPORT_DIR", required=True, help="output folder (written atomically)")
    s.add_argument("--dtype", choices=["fp32", "fp16"],
                   help="activations, KV cache and float weights (default fp32; fp16 for int8-w8a16 and int4-w4a16, "
                        "whose fp16 scales make TensorRT's GEMMs fp16); with --graph fused --precision int4 or "
                        "int8-w8a8-dynamic, fp16 is the GPU form (onnxruntime's CUDA provider) and fp32 the CPU one")
    s.add_argument("--precision", choices=EXPORT_PRECISIONS,
                   help="weights as written, straight from the checkpoint, tensor by tensor: fp32, fp16, int8-w8a16, "
                        "int8-w8a8 or int4-w4a16 (explicit Q/DQ for TensorRT; w8a8 takes --calib), int8-w8a8-dynamic "
                        "or int4 (onnxruntime MatMulNBits, --graph fused); int4 and int4-w4a16 take an optional "
                        "--calib (calibrated: --int4-method)")
    s.add_argument("--block-size", type=int,
                   help="int8-w8a8-dynamic / int4 / int4-w4a16: input channels per weight scale (default 32; "
                        "int4-w4a16: 128 or 64, what TensorRT takes, the largest dividing the model's sizes)")
    s.add_argument("--lm-head-bits", type=int, choices=[4, 8],
                   help="int4 / int4-w4a16: lm_head's weight bits (default 8: far better quality for few bytes)")
    s.add_argument("--int4-method", choices=INT4_METHODS,
                   help="int4 / int4-w4a16 with --calib: auto (default: awq-gptq-e2e below 1B parameters, "
                        "awq-gptq from 1B), awq-gptq (AWQ's scaling, then GPTQ's rounding), awq-gptq-layerwise (then "
                        "the block scales tuned on each decoder layer's output: about 5x awq-gptq's time), "
                        "awq-gptq-e2e (then tuned on the whole model's output: about 5x awq-gptq's time, the best "
                        "perplexity) or awq (AWQ's scaling, then round to nearest)")
    _add_w8a8_args(s)
    s.add_argument("--graph", choices=GRAPHS, default="portable",
                   help="portable: traced standard ONNX ops, runs anywhere incl. TensorRT; fused: onnxruntime "
                        "contrib ops (GroupQueryAttention with an in-place KV cache), fastest on onnxruntime")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    s.add_argument("--max-window-check", type=_count(1), default=MAX_WINDOW_CHECK,
                   help="longest run for the sliding-window check (3W+5 tokens; longer ones are skipped)")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="onnxruntime execution provider for the check")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("verify", help="run the ONNX with onnxruntime against PyTorch and print a table")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="export folder")
    s.add_argument("--model", help="checkpoint to compare with (default: the source recorded in the manifest)")
    s.add_argument("--max-window-check", type=_count(1), default=MAX_WINDOW_CHECK)
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("tokenize", help="show the exact token ids a conversation becomes, as JSON (ending with a user "
                       "message: ready for the reply; with an assistant message: the training form, its EOS included; "
                       "\"prefix\": true: the continuation form)")
    s.add_argument("export_dir", nargs="?", metavar="EXPORT_DIR", help="export folder (its manifest names the chat format)")
    s.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json instead of an export folder")
    s.add_argument("--messages", required=True, help='JSON file: [{"role": ..., "content": ...}, ...]')
    s.add_argument("--format", choices=["mistral-v1", "template"], help="override the chat format")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("generate", help="generate a reply (streamed) from an export or engine folder")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="export folder, or engine folder (TensorRT)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a user message (in the model's chat format unless --raw)")
    src.add_argument("--messages", metavar="CONV.json", help='a conversation [{"role", "content"}, ...] ending with a '
                     'user message, or with an assistant message marked "prefix": true, whose text the reply continues')
    src.add_argument("--ids", type=_ints, help="prompt token ids, comma-separated (as `tokenize` prints them)")
    s.add_argument("--raw", action="store_true",
                   help="no chat format: the text as the model's tokenizer encodes it (with BOS only where that "
                        "tokenizer adds one: manifest tokenizer.add_bos; Mistral: yes, the demo model: no)")
    s.add_argument("--json", action="store_true", help='print {"prompt_ids", "ids", "text", "stats"} as JSON')
    _add_sampling_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat, streamed")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="export folder, or engine folder (TensorRT)")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--say", help="one message instead of reading stdin (for scripts and `make demo`)")
    s.add_argument("--messages", metavar="CONV.json", help="a conversation to go on with (answered first if it ends "
                   "with a user message or a \"prefix\": true assistant message)")
    _add_sampling_args(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (streaming, continuous batching)")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="export folder (fused graph: continuous batching), or engine folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_count(0, 65535), default=8000, help="0: any free port (the address is printed)")
    s.add_argument("--max-batch", type=_count(1), default=8, help="sequences generated at once (KV-cache slots)")
    s.add_argument("--max-queue", type=_count(0), default=64, help="requests waiting for a slot; beyond it, 429")
    s.add_argument("--max-context", "--max-model-len", type=_count(2), help="positions per sequence, prompt + completion "
                   "(default: the model's limit); each slot's cache is sized for it")
    s.add_argument("--prefill-chunk", type=_count(1), default=512, help="most prompt tokens of one sequence per step")
    s.add_argument("--itl-slack", type=_positive, default=2.5, help="a step that prefills beside decoding may take "
                   "this many times a decode-only step (lower: smoother streams, slower prompts)")
    g = s.add_argument_group("access (docs/serving.md, Operations)")
    g.add_argument("--api-key", action="append", metavar="KEY", help="require `Authorization: Bearer KEY`; repeat for "
                   "several keys (also: $MISTRAL_TRT_API_KEY, --api-key-file; default: no key)")
    g.add_argument("--api-key-file", metavar="FILE", help="more keys, one a line (blank lines and # comments skipped)")
    g.add_argument("--protect-metrics", action="store_true", help="/metrics asks for a key too (/health never does)")
    g.add_argument("--allowed-origins", nargs="+", type=_origin, metavar="ORIGIN", help="CORS: browser pages from "
                   "these origins may call the API (preflight answered); * for any")
    g.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    g.add_argument("--ssl-keyfile", metavar="PEM", help="its private key (if not in --ssl-certfile)")
    g.add_argument("--log-prompts", action="store_true", help="the access log (one JSON line a request, stderr) "
                   "holds each request's messages or prompt (default: never)")
    s.add_argument("--model-name", help="the name clients pass as `model` (default: the folder's name)")
    s.add_argument("--safe-prompt", action="store_true", help="prepend Mistral's guardrail system prompt unless a "
                   "request says safe_prompt: false")
    g = s.add_argument_group("limits (docs/serving.md, Operations)")
    g.add_argument("--shutdown-timeout", metavar="S", type=_positive, default=30.0, help="after SIGTERM, seconds the requests already "
                   "taken get to finish (default 30); then they end with an error")
    g.add_argument("--max-body-bytes", metavar="BYTES", type=_count(1), default=Limits.max_body_bytes, help="a request body larger "
                   "than this is a 413, refused before or while it is read (default 8 MiB)")
    g.add_argument("--header-timeout", metavar="S", type=_positive, default=Limits.header_timeout, help="seconds a connection "
                   "gets to send a request's headers (default 10); then it is closed")
    g.add_argument("--read-timeout", metavar="S", type=_positive, default=Limits.read_timeout, help="seconds a request's body "
                   "gets to arrive after its headers (default 60); then a 408")
    g.add_argument("--request-timeout", metavar="S", type=_seconds_or_off, default=Limits.request_timeout, help="seconds a request "
                   "may take from its body to its last token (default 900; 0: no limit); then a 408 or an error event")
    g.add_argument("--default-max-tokens", metavar="N", type=_count(1), default=Limits.default_max_tokens, help="max_tokens of a "
                   "request that leaves it out (default 2048, or the context's room if less)")
    g.add_argument("--max-connections", metavar="N", type=_count(1), default=Limits.max_connections, help="open connections "
                   "(default 512); a request on one past it gets a 503")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="onnxruntime execution provider")
    s.add_argument("--speculate", type=_speculation, metavar="ngram[:K]", help="speculative decoding for every request "
                   "(prompt-lookup drafts, checked by the model: the same output; fused graph)")
    s.add_argument("--no-prefix-cache", action="store_true", help="feed every prompt whole (default, fused graph: a "
                   "slot keeps its tokens after its request, and a prompt starting the same way is fed from where it "
                   "differs)")
    s.add_argument("--prefix-cache-mib", metavar="MIB", type=_count(0), help="host memory for prefixes kept once "
                   "their slot is taken by another request, least recently used dropped first (default 1024, or a "
                   "quarter of the memory the slots leave if less; 0: slots only); more than the memory available is "
                   "refused")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("triton-repo", help="an export as an NVIDIA Triton model repository (python backend, streamed)")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="export folder")
    s.add_argument("-o", "--output", metavar="REPO", required=True, help="model repository folder (written atomically)")
    s.add_argument("--name", help="the model's name in Triton (default: the export folder's name)")
    s.add_argument("--instances", type=_count(1), default=1, help="model instances (instance_group count): processes, "
                   "each with its own scheduler and copy of the weights")
    s.add_argument("--max-batch", type=_count(1), default=8, help="sequences each instance generates at once")
    s.add_argument("--max-queue", type=_count(0), default=64, help="requests waiting per instance; beyond it, an error")
    s.add_argument("--max-context", "--max-model-len", type=_count(2), help="positions per sequence, prompt + completion (default: the "
                   "model's limit); each slot's cache is sized for it")
    s.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime provider in the model")
    s.add_argument("--speculate", type=_speculation, metavar="ngram[:K]", help="speculative decoding for every request "
                   "(prompt-lookup drafts, checked by the model: the same output; fused graph), as serve --speculate")
    s.add_argument("--force", action="store_true", help="replace an earlier repository written by triton-repo")
    s.set_defaults(func=cmd_triton_repo)

    s = sub.add_parser("triton-serve", help="start tritonserver on a model repository (Ctrl-C or SIGTERM stops it)")
    s.add_argument("repo", metavar="REPO", help="model repository (mistral-trt triton-repo)")
    s.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics (default: this machine only)")
    s.add_argument("--http-port", type=_count(1), default=8000)
    s.add_argument("--grpc-port", type=_count(1), default=8001)
    s.add_argument("--metrics-port", type=_count(1), default=8002)
    s.add_argument("--log-verbose", type=_count(0), default=0, help="tritonserver's --log-verbose")
    s.set_defaults(func=cmd_triton_serve)

    s = sub.add_parser("bench-serve", help="the server under 1..N concurrent streaming clients: table, JSON and PNG")
    s.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR")
    s.add_argument("--concurrency", type=_ints, default=[1, 4, 16], help="concurrent streams (1: one at a time)")
    s.add_argument("--rounds", type=_count(1), default=2, help="requests per level = rounds x concurrency (at least 4)")
    s.add_argument("--prompt-len", type=_range, default=(32, 1024), help="prompt lengths, uniform in LOW-HIGH tokens")
    s.add_argument("--max-tokens", type=_count(2), default=128, help="tokens generated per request")
    s.add_argument("--long-prompt", type=_count(1), default=1024, help="the prompt that arrives while streams decode")
    s.add_argument("--triton", metavar="CLI", help="also serve each export through Triton (`triton-serve`, run by this "
                   "mistral-trt command: an environment with nvidia-pytriton), levels alternated with `serve`")
    s.add_argument("--speculate", type=_speculation, metavar="ngram[:K]", help="also serve each export with `serve "
                   "--speculate` (fused graph), levels alternated with plain `serve`")
    s.add_argument("--multi-turn", type=_users_turns, metavar="USERSxTURNS", help="instead: USERS concurrent "
                   "conversations of TURNS turns each (e.g. 8x4), TTFT per turn with and without the prefix cache")
    s.add_argument("--system-len", type=_count(1), default=1000, help="--multi-turn: the shared system prompt's tokens")
    s.add_argument("--warm", action="store_true", help="each level's prompts sent again after their first (cold) "
                   "round: a second row per level, the prefix cache's case")
    s.add_argument("--baseline", action="append", choices=["llama-server"], help="also llama.cpp's server on an f32 "
                   "GGUF of the same checkpoint, levels alternated with ours (bash scripts/build_llama_server.sh builds "
                   "it); with --multi-turn, the same conversations")
    s.add_argument("--llama-server", metavar="BIN", help="the llama-server binary (default: "
                   "build/llama-server/bin/llama-server)")
    s.add_argument("-o", "--output", default="build/bench-serve", help="folder for bench-serve.md, .json, .png")
    s.set_defaults(func=cmd_bench_serve)

    s = sub.add_parser("bench-structured", help="structured outputs: grammar engines (llguidance, xgrammar) and "
                       "constrained against unconstrained decoding: table, JSON and PNG")
    s.add_argument("export_dir", metavar="EXPORT_DIR")
    s.add_argument("--concurrency", type=_ints, default=[1, 16], help="streams at once")
    s.add_argument("--max-tokens", type=_count(2), default=64, help="tokens per request (fewer than a reply to the "
                   "60-integer schema, so every request yields exactly this many)")
    s.add_argument("--rounds", type=_count(1), default=2, help="alternated rounds per level (the best is kept)")
    s.add_argument("-o", "--output", default="build/bench-structured", help="folder for bench-structured.md, .json, .png")
    s.set_defaults(func=cmd_bench_structured)

    s = sub.add_parser("bench-speculate", help="speculative decoding against plain decoding on grounded and open "
                       "prompts, with the ceiling of its drafts: table, JSON and PNG")
    s.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR", help="fused-graph export folder(s)")
    s.add_argument("--speculate", type=_speculation, default="ngram", metavar="ngram[:K]")
    s.add_argument("--max-new-tokens", type=_count(2), default=128)
    s.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("-o", "--output", default="build/bench-speculate", help="folder for bench-speculate.md, .json, .png")
    s.set_defaults(func=cmd_bench_speculate)

    s = sub.add_parser("bench", help="latency against baselines, side by side: table, JSON and PNG")
    s.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR", help="export or engine folder(s); the first is \"ours\"")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    s.add_argument("--baseline", action="append", choices=["hf", "ort-genai", "ort-genai-int4", "llama.cpp",
                                                            "llama.cpp-q8_0", "llama.cpp-q4_1"], default=[],
                   help="baseline measured in the same run (repeatable); ort-genai: its builder's model of the same "
                        "checkpoint in the first export's dtype, -int4 its int4 (MatMulNBits); llama.cpp: float32 GGUF "
                        "of the same checkpoint, -q8_0 / -q4_1 quantized from it by llama.cpp (needs llama-cpp-python; "
                        "skipped with a note without)")
    s.add_argument("--prompt-len", type=_ints, default=[128, 512, 2048])
    s.add_argument("--gen-len", type=_count(2), default=128)
    s.add_argument("--batch", type=_ints, default=[1])
    s.add_argument("--warmup", type=_count(0), default=1)
    s.add_argument("--repeat", type=_count(1), default=3)
    s.add_argument("-o", "--output", default="build/bench", help="folder for bench.md, bench.json, bench.png")
    s.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for the floor (GPUs: the card's "
                   "data-sheet figure, e.g. 3350 for an H100 SXM); default: host memory, measured in the run")
    s.add_argument("--genai-cache", default="build/ort-genai", help="where onnxruntime-genai models are built")
    s.add_argument("--cpp", action="store_true", help="also run each EXPORT_DIR on the C++ runtime (make cpp), "
                   "side by side with the Python runtime")
    s.add_argument("--cpp-lib", default="build/cpp/libmistral_trt.so", help="the C++ runtime's library (--cpp)")
    s.add_argument("--target", action="append", default=[], metavar="FAST/SLOW>=RATIO",
                   help="a decode-speed target checked in the report, e.g. 'ours:int4/ours:int8>=1.4' (repeatable; "
                        "system names as in the table)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("calibrate", help="chat-formatted calibration sequences + held-out eval text and chat")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="fp32 export folder (its model writes the replies)")
    s.add_argument("-o", "--output", metavar="CALIB_DIR", required=True, help="calibration folder (written atomically)")
    s.add_argument("--count", type=_count(1), default=256, help="number of sequences")
    s.add_argument("--reply-tokens", type=_count(1), default=48, help="longest generated reply per sequence")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("engine", help="export folder -> TensorRT engine folder (needs tensorrt and a GPU)")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="export folder (fp32, fp16 or a Q/DQ int8 artifact)")
    s.add_argument("-o", "--output", metavar="ENGINE_DIR", required=True, help="engine folder (written atomically)")
    s.add_argument("--max-batch", type=_count(1), default=1)
    s.add_argument("--max-step-tokens", "--max-seq", type=_count(1), default=512,
                   help="most tokens one sequence takes in one step: the longest prefill chunk (the prefill profile's seq)")
    s.add_argument("--max-context", "--max-total", type=_count(2),
                   help="most positions a sequence reaches on this engine: past + seq (default: the model's limit, at most 4096)")
    s.add_argument("--timing-cache", help="timing cache file to reuse and update (default: one inside the engine folder)")
    s.add_argument("--workspace-gib", type=_positive, help="TensorRT workspace limit")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_engine)

    s = sub.add_parser("quantize", help="fp32 export -> fp16 or int8 (explicit Q/DQ) export")
    s.add_argument("export_dir", metavar="EXPORT_DIR", help="fp32 export folder")
    s.add_argument("--precision", required=True, choices=PRECISIONS,
                   help="int8-w8a8-dynamic, int4: fused-graph exports (onnxruntime MatMulNBits); the others: portable exports")
    s.add_argument("--block-size", type=int,
                   help="int8-w8a8-dynamic / int4 / int4-w4a16: input channels per weight scale (default 32: best "
                        "quality; 64: 10-17%% faster int8 decode; int4-w4a16: 128 or 64, what TensorRT takes)")
    s.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=8,
                   help="int4 / int4-w4a16: lm_head's weight bits (8: far better quality for few bytes)")
    _add_w8a8_args(s)
    s.add_argument("-o", "--output", metavar="EXPORT_DIR", required=True)
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity, top-1 agreement and KL against fp32 on held-out text or chat")
    s.add_argument("export_dirs", nargs="+", metavar="EXPORT_DIR")
    held_out = s.add_mutually_exclusive_group(required=True)
    held_out.add_argument("--text", help="held-out text file (e.g. CALIB_DIR/eval.txt)")
    held_out.add_argument("--chat", metavar="CALIB_DIR",
                          help="a calibration folder: its held-out chat conversations (eval_chat.npz)")
    s.add_argument("--reference", help="fp32 export (default: the first EXPORT_DIR)")
    s.add_argument("--window", type=_count(2), default=512)
    s.add_argument("--max-tokens", type=_count(2))
    s.add_argument("-o", "--output", default="build/eval", help="folder for eval.md, eval.json, eval.png")
    s.set_defaults(func=cmd_eval)
    return p


def given_flags(p: argparse.ArgumentParser, command: str, argv: list[str]) -> set[str]:
    """The option strings of `command` that argv spells out (so a flag given at its default value still counts)."""
    sub = next(x for x in p._actions if isinstance(x, argparse._SubParsersAction)).choices[command]
    known = {o: next((x for x in a.option_strings if x.startswith("--")), o)  # an alias: its flag's first name
             for a in sub._actions for o in a.option_strings}
    out = set()
    for arg in argv:
        head = arg.split("=", 1)[0]
        if head in known:
            out.add(known[head])
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    a = p.parse_args(argv)
    a.given = given_flags(p, a.command, argv)
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM unwinds like Ctrl-C (runtime/errors.py)
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (an embedding program): leave signals to it
            pass
    try:
        a.func(a)
        check_interrupted()
    except UserError as e:
        if interrupted():
            return 128 + interrupted()
        print(f"mistral-trt {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `mistral-trt generate ... | head`: the reader left
        sys.stderr.close()
        return 141
    except (OSError, MemoryError) as e:
        what = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "") if isinstance(e, OSError) else "out of memory"
        print(f"mistral-trt {a.command}: error: {what}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line, the traceback on request
        if interrupted():  # e.g. a C extension's import failing because the signal landed inside it
            return 128 + interrupted()
        if os.environ.get("MISTRAL_TRT_DEBUG"):
            raise
        print(f"mistral-trt {a.command}: internal error: {type(e).__name__}: {str(e)[:300]} "
              "(a bug: rerun with MISTRAL_TRT_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
