"""The files other clients look for in an export folder, derived from the manifest (the source of truth) and
covered by its sha256 like every other file:

    config.json               transformers' MistralConfig of the model (optimum's ORTModelForCausalLM reads it)
    generation_config.json    bos / eos / pad ids
    tokenizer_config.json     the checkpoint's, with a tokenizer class transformers 4.x and 5.x both know and
                              the special tokens and BOS rule stated explicitly (AutoTokenizer gives our ids)
    genai_config.json         onnxruntime-genai's model description (portable graph only)

onnxruntime-genai drives a graph with `input_ids`, `attention_mask` and `position_ids` and a cache it names by
pattern: our portable graph's contract exactly. The fused graph takes `seqlens_k`, `query_seqlens` and
`logits_index` instead of a mask, which onnxruntime-genai does not feed (its own builder computes them inside
its graphs from the mask), so a fused export gets no genai_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from mistral_trt.runtime.manifest import ONNX_NAME, Manifest

INTEROP_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "genai_config.json")
# Written by transformers 5 (class and loader fields 4.x does not know); replaced or dropped here.
TRANSFORMERS5_ONLY = ("backend", "is_local", "local_files_only")


def hf_config(m: Manifest) -> dict:
    a = m.model
    return {
        "architectures": [a.architecture], "model_type": "mistral", "vocab_size": a.vocab_size,
        "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim,
        "max_position_embeddings": a.max_position_embeddings, "rms_norm_eps": a.rms_norm_eps,
        "rope_theta": a.rope_theta, "sliding_window": a.sliding_window, "tie_word_embeddings": a.tie_word_embeddings,
        "hidden_act": "silu", "bos_token_id": m.bos_token_id,
        "eos_token_id": m.eos_token_id[0] if len(m.eos_token_id) == 1 else m.eos_token_id,
        "pad_token_id": m.pad_token_id, "use_cache": True,
        "torch_dtype": {"fp32": "float32", "fp16": "float16"}[m.dtype],
    }


def generation_config(m: Manifest) -> dict:
    eos = m.eos_token_id[0] if len(m.eos_token_id) == 1 else m.eos_token_id
    return {"bos_token_id": m.bos_token_id, "eos_token_id": eos, "pad_token_id": m.pad_token_id}


def tokenizer_config(m: Manifest, original: dict, piece) -> dict:
    """`piece(id)`: the token's text. The class: PreTrainedTokenizerFast for a tokenizer.json (both transformers
    majors load it as it is), LlamaTokenizer for a sentencepiece model (Mistral's own choice)."""
    cfg = {k: v for k, v in original.items() if k not in TRANSFORMERS5_ONLY}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast" if m.tokenizer["file"].endswith(".json") else "LlamaTokenizer"
    if m.bos_token_id is not None:
        cfg["bos_token"] = piece(m.bos_token_id)
    if m.eos_token_id:
        cfg["eos_token"] = piece(m.eos_token_id[0])
    if m.pad_token_id is not None:
        cfg["pad_token"] = piece(m.pad_token_id)
    cfg["add_bos_token"], cfg["add_eos_token"] = m.tokenizer["add_bos"], False
    cfg["model_max_length"] = m.max_context
    if m.chat_format == "template":
        cfg["chat_template"] = m.chat_template
    return cfg


def genai_config(m: Manifest) -> dict:
    a = m.model
    return {
        "model": {
            "bos_token_id": m.bos_token_id, "context_length": m.max_context,
            "eos_token_id": m.eos_token_id[0] if len(m.eos_token_id) == 1 else m.eos_token_id,
            "pad_token_id": m.pad_token_id if m.pad_token_id is not None else m.eos_token_id[0],
            "type": "mistral", "vocab_size": a.vocab_size,
            "decoder": {
                "filename": ONNX_NAME, "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": a.head_dim, "hidden_size": a.hidden_size, "num_attention_heads": a.num_heads,
                "num_hidden_layers": a.num_layers, "num_key_value_heads": a.num_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": m.max_context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_interop_files(folder: Path, m: Manifest, piece) -> list[str]:
    """Write the files into `folder` (before the manifest hashes them); returns their names."""
    original = {}
    if (folder / "tokenizer_config.json").is_file():
        original = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    files = {"config.json": hf_config(m), "generation_config.json": generation_config(m),
             "tokenizer_config.json": tokenizer_config(m, original, piece)}
    if m.graph == "portable":
        files["genai_config.json"] = genai_config(m)
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return list(files)
