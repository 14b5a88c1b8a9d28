"""Read and check a Hugging Face checkpoint folder before any weight is loaded.

Everything that can be wrong with the input is found here and reported as a UserError naming the file and
field: a missing folder, an unsupported architecture, missing tokenizer files, weights whose names or shapes
do not match config.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mistral_trt.runtime.errors import UserError, read_json
from mistral_trt.runtime.integrity import sha256  # noqa: F401  (export's callers use ck.sha256)
from mistral_trt.runtime.manifest import ModelArgs

SUPPORTED = {"mistral": "MistralForCausalLM"}  # model_type -> architecture
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # at least one is required
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Checkpoint:
    path: Path
    config: dict
    weight_files: list[Path]
    tokenizer_files: list[Path]  # everything tokenizer-related to copy beside the ONNX

    @property
    def args(self) -> ModelArgs:
        c = self.config
        heads = c["num_attention_heads"]
        return ModelArgs(
            architecture=SUPPORTED[c["model_type"]],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=c["max_position_embeddings"],
            sliding_window=c.get("sliding_window"),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def read_json(self, name: str) -> dict:
        """An optional JSON file of the checkpoint ({} when absent)."""
        p = self.path / name
        return read_json(p) if p.is_file() else {}


def resolve(model: str) -> Path:
    """A local folder, or a hub id downloaded where the hub is reachable."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: not a folder (expected a Hugging Face checkpoint folder with config.json)")
        if not os.access(p, os.R_OK | os.X_OK):
            raise UserError(f"{p}: folder is not readable")
        return p
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
        except Exception as e:
            raise UserError(f"{model}: no such folder, and downloading it from the hub failed: {type(e).__name__}: {e}") from None
    raise UserError(f"{p}: no such folder (expected a Hugging Face checkpoint folder with config.json)")


def inspect_checkpoint(path: Path) -> Checkpoint:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing (expected a Hugging Face checkpoint folder)")
    config = read_json(cfg_path)
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    model_type = config.get("model_type")
    supported = ", ".join(f"{a} (model_type '{t}')" for t, a in SUPPORTED.items())
    if model_type not in SUPPORTED:
        archs = config.get("architectures")
        raise UserError(f"{cfg_path}: model_type {model_type!r} (architectures {archs}) is not supported; supported: {supported}")
    archs = config.get("architectures") or [SUPPORTED[model_type]]
    if SUPPORTED[model_type] not in archs:
        raise UserError(f"{cfg_path}: architectures {archs} is not supported; supported: {supported}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise UserError(f"{cfg_path}: field {key!r} must be a positive integer, got {config.get(key)!r}")
    w = config.get("sliding_window")
    if w is not None and (not isinstance(w, int) or w < 1):
        raise UserError(f"{cfg_path}: field 'sliding_window' must be null or a positive integer, got {w!r}")

    tok = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not tok:
        raise UserError(f"{path}: no tokenizer: expected {' or '.join(TOKENIZER_FILES)} beside config.json")
    tok += [path / n for n in TOKENIZER_EXTRAS if (path / n).is_file()]

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{path}: no weights: expected *.safetensors files beside config.json")
    return Checkpoint(path=path, config=config, weight_files=weights, tokenizer_files=tok)


def expected_shapes(config: dict) -> tuple[dict[str, tuple], set[str]]:
    """Parameter name -> shape for this config, and the names a checkpoint may omit (tied lm_head)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    return shapes, optional


def check_weights(ckpt: Checkpoint) -> None:
    """Compare tensor names and shapes in the safetensors headers with what config.json implies."""
    from safetensors import safe_open

    want, optional = expected_shapes(ckpt.config)
    found: dict[str, tuple[tuple, str]] = {}
    for f in ckpt.weight_files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    found[k] = (tuple(st.get_slice(k).get_shape()), f.name)
        except Exception as e:
            raise UserError(f"{f}: not a readable safetensors file: {e}") from None
    problems = []
    for k, shape in want.items():
        if k not in found:
            if k not in optional:
                problems.append(f"{k} is missing (config expects {list(shape)})")
        elif found[k][0] != shape:
            problems.append(f"{k} has shape {list(found[k][0])} in {found[k][1]}, config.json expects {list(shape)}")
    extra = sorted(set(found) - set(want))
    if extra:
        problems.append(f"{len(extra)} tensor(s) the config does not use, e.g. {extra[0]} in {found[extra[0]][1]}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(
            f"{ckpt.path}: weights do not match config.json: " + "; ".join(problems[:5]) + more
        )


def special_tokens(ckpt: Checkpoint) -> dict:
    """bos/eos/pad ids, from generation_config.json, then config.json (eos may be a list)."""
    gen, cfg = ckpt.read_json("generation_config.json"), ckpt.config

    def pick(key):
        for src in (gen, cfg):
            if src.get(key) is not None:
                return src[key]
        return None

    eos = pick("eos_token_id")
    eos = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    return {"bos_token_id": pick("bos_token_id"), "eos_token_id": eos, "pad_token_id": pick("pad_token_id")}


def chat_format(ckpt: Checkpoint) -> tuple[str, str | None]:
    """`mistral-v1` for Mistral's v1 sentencepiece tokenizer; else the checkpoint's own chat template; else none.

    A Mistral v1 tokenizer is a sentencepiece model with <s>, </s> at 1, 2 and no [INST] control piece
    (v3 tokenizers made [INST] a control token and use another format).
    """
    sp_path = ckpt.path / "tokenizer.model"
    if sp_path.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
        if sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>" and sp.piece_to_id("[INST]") == sp.unk_id():
            return "mistral-v1", None
    jinja = ckpt.path / "chat_template.jinja"
    if jinja.is_file():
        return "template", jinja.read_text(encoding="utf-8")
    template = ckpt.read_json("tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        return "template", template
    return "none", None


def tokenizer_record(ckpt: Checkpoint, specials: dict) -> dict:
    """The manifest's `tokenizer`: the file the runtime loads, its vocabulary size and its own BOS rule,
    checked against config.json before any weight is loaded (another model's tokenizer is refused here)."""
    from mistral_trt.runtime.tokenizer import Tokenizer

    main = next(f for f in ckpt.tokenizer_files if f.name in TOKENIZER_FILES)  # tokenizer.model first
    tok = Tokenizer.load(main)
    vocab = ckpt.config["vocab_size"]
    if tok.vocab_size > vocab:
        raise UserError(f"{main}: {tok.vocab_size} tokens, more than config.json's vocab_size {vocab}: "
                        "not this model's tokenizer")
    for key in ("bos_token_id", "pad_token_id"):
        if specials[key] is not None and not (isinstance(specials[key], int) and 0 <= specials[key] < vocab):
            raise UserError(f"{ckpt.path}: {key} {specials[key]!r} is not a token id below vocab_size {vocab}")
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in specials["eos_token_id"]):
        raise UserError(f"{ckpt.path}: eos_token_id {specials['eos_token_id']!r}: expected token ids below vocab_size {vocab}")
    if tok.add_bos and specials["bos_token_id"] is not None and tok.bos_id != specials["bos_token_id"]:
        raise UserError(f"{main}: its BOS token is id {tok.bos_id}, config says bos_token_id "
                        f"{specials['bos_token_id']}: not this model's tokenizer")
    return {"file": main.name, "vocab_size": tok.vocab_size, "add_bos": bool(tok.add_bos)}
