"""`mistral-trt <command>`: the one entry point. Each command imports only what it needs, so the
runtime commands work on a runtime-only install (no torch)."""
from __future__ import annotations

import argparse
import sys

from mistral_trt.runtime.errors import UserError


def cmd_convert_gguf(a):
    from mistral_trt.export.gguf_convert import DEMO_NAME, convert_gguf, default_gguf

    src = a.gguf or default_gguf()
    out = convert_gguf(src, a.output or f"build/{DEMO_NAME}", force=a.force)
    print(out)


def cmd_export(a):
    from mistral_trt.export.pipeline import export_model

    export_model(a.model, a.output, dtype=a.dtype, force=a.force, run_verify=not a.no_verify,
                 max_window_check=a.max_window_check, provider=a.provider)


def cmd_verify(a):
    from mistral_trt.export.pipeline import verify_export

    verify_export(a.folder, a.model, max_window_check=a.max_window_check, provider=a.provider)


def parser() -> argparse.ArgumentParser:
    from mistral_trt.export.verify import MAX_WINDOW_CHECK  # a constant; verify.py imports numpy only at top

    p = argparse.ArgumentParser(prog="mistral-trt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("convert-gguf", help="llama-architecture GGUF -> Hugging Face folder (MistralForCausalLM)")
    s.add_argument("gguf", nargs="?", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("-o", "--output", help="output folder (default: build/smollm2-135m-instruct)")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(func=cmd_convert_gguf)

    s = sub.add_parser("export", help="Hugging Face checkpoint -> ONNX with KV cache + manifest.json, verified")
    s.add_argument("model", help="checkpoint folder (or a hub id where the hub is reachable)")
    s.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    s.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    s.add_argument("--max-window-check", type=int, default=MAX_WINDOW_CHECK,
                   help="longest run for the sliding-window check (3W+5 tokens; longer ones are skipped)")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="onnxruntime execution provider for the check")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("verify", help="run the ONNX with onnxruntime against PyTorch and print a table")
    s.add_argument("folder", help="export folder")
    s.add_argument("--model", help="checkpoint to compare with (default: the source recorded in the manifest)")
    s.add_argument("--max-window-check", type=int, default=MAX_WINDOW_CHECK)
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    s.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        a.func(a)
    except UserError as e:
        print(f"mistral-trt {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
