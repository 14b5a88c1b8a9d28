"""Token ids <-> text, for the tokenizer files an export carries.

    tok = Tokenizer.load("build/onnx/mistral-7b-fp16")      # tokenizer.model (sentencepiece) or tokenizer.json
    ids = tok.encode("Hello world")                          # np.ndarray int64, no BOS unless bos=True
    tok.decode(ids)                                          # 'Hello world'

Text is always text: "</s>" or "[INST]" typed by a user are encoded as ordinary characters, never as
control tokens (sentencepiece does this by itself; for tokenizer.json, see `encode`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError


class Tokenizer:
    def __init__(self, kind: str, impl, bos_id: int | None, eos_id: int | None, path: Path):
        self.kind, self.impl, self.bos_id, self.eos_id, self.path = kind, impl, bos_id, eos_id, path

    @classmethod
    def load(cls, where: str | Path) -> "Tokenizer":
        """A folder (tokenizer.model preferred, then tokenizer.json) or one of those files."""
        p = Path(where)
        if p.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (p / name).is_file():
                    return cls.load(p / name)
            raise UserError(f"{p}: no tokenizer.model or tokenizer.json")
        if not p.is_file():
            raise UserError(f"{p}: no such tokenizer file")
        if p.suffix == ".json":
            return cls._load_json(p)
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(p))
        except Exception as e:
            raise UserError(f"{p}: not a sentencepiece model: {e}") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        return cls("sentencepiece", sp, bos if bos >= 0 else None, eos if eos >= 0 else None, p)

    @classmethod
    def _load_json(cls, p: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tk = HFTokenizer.from_file(str(p))
        except Exception as e:
            raise UserError(f"{p}: not a tokenizers JSON file: {e}") from None
        cfg_path = p.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

        def token_id(key):
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tk.token_to_id(t) if isinstance(t, str) else None

        return cls("tokenizers", tk, token_id("bos_token"), token_id("eos_token"), p)

    @property
    def vocab_size(self) -> int:
        return self.impl.get_piece_size() if self.kind == "sentencepiece" else self.impl.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, specials: bool = False) -> np.ndarray:
        """specials=True lets tokenizer.json's special tokens written as text (e.g. "<|im_start|>") become
        their ids: that is how a rendered chat template is read. User text is encoded with specials=False."""
        if self.kind == "sentencepiece":
            ids = self.impl.encode(text)
        elif specials:
            ids = self.impl.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_plain(text)
        if bos:
            if self.bos_id is None:
                raise UserError(f"{self.path}: this tokenizer has no BOS token")
            ids = [self.bos_id] + list(ids)
        return np.asarray(ids, dtype=np.int64)

    def _encode_plain(self, text: str) -> list[int]:
        # tokenizers matches added tokens in the input unless told to encode them as text.
        self.impl.encode_special_tokens = True
        try:
            return self.impl.encode(text, add_special_tokens=False).ids
        finally:
            self.impl.encode_special_tokens = False

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.impl.decode(ids)
        return self.impl.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.impl.id_to_piece(int(i)) if self.kind == "sentencepiece" else self.impl.id_to_token(int(i))

    def is_special(self, i: int) -> bool:
        if self.kind == "sentencepiece":
            return self.impl.is_control(int(i))
        t = self.impl.get_added_tokens_decoder().get(int(i))
        return bool(t and t.special)


class StreamDecoder:
    """Push ids one at a time, get the text they add.

    Joined chunks equal `tok.decode(all ids)`: each step decodes a short window of ids and emits only
    what the window gained, so the sentencepiece rule "drop the leading space of the first piece" and
    byte-level merges stay exactly as in a full decode. A character whose bytes are split across
    byte-fallback tokens decodes to U+FFFD until complete, so such text is held back until then.

        >>> d = StreamDecoder(tok)
        >>> "".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids)
        True
    """

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def push(self, i: int) -> str:
        self.ids.append(int(i))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
