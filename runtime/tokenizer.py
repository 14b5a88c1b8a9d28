"""Token ids <-> text, for the tokenizer files an export carries.

    tok = Tokenizer.load("build/onnx/mistral-7b-fp16")      # tokenizer.model (sentencepiece) or tokenizer.json
    ids = tok.encode("Hello world")                          # np.ndarray int64, no BOS unless bos=True
    tok.decode(ids)                                          # 'Hello world'

Text is always text: "</s>" or "[INST]" typed by a user are encoded as ordinary characters, never as
control tokens (sentencepiece does this by itself; for tokenizer.json, see `encode`).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import UserError, read_json

ENCODE_PIECE = 16384  # characters of user text encoded at once (Tokenizer._pieces)
# Where GPT-2's pre-tokenizer regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) always
# ends a pre-token, in Python's classes, each certain: before a space that follows a non-space (the space joins
# what follows); between a letter or number ([^\W\d_] is one of them) and a character that is neither nor space
# ([^\w\s]); and back, unless that character is an apostrophe (which may begin a contraction).
CUT = re.compile(r"(?<=\S) |(?<=[^\W\d_])(?=[^\w\s])|(?<=[^\w\s'])(?=[^\W\d_])")


class Tokenizer:
    """`add_bos`: whether this tokenizer itself puts BOS before a text (sentencepiece/Mistral: yes; a
    tokenizer.json: what its post-processor does, unless tokenizer_config.json sets `add_bos_token`, as
    transformers reads it). `--raw` prompts follow it, so ids equal what HF, optimum and onnxruntime-genai feed."""

    def __init__(self, kind: str, impl, bos_id: int | None, eos_id: int | None, path: Path, add_bos: bool):
        self.kind, self.impl, self.bos_id, self.eos_id, self.path = kind, impl, bos_id, eos_id, path
        self.add_bos = add_bos
        if kind == "tokenizers":  # what _encode_plain uses
            self._plain = type(impl).from_str(impl.to_str())
            self._plain.encode_special_tokens = True

    @classmethod
    def load(cls, where: str | Path) -> "Tokenizer":
        """A tokenizer file (tokenizer.model, tokenizer.json), or a folder holding one (tokenizer.model
        preferred). An export folder: use `for_export`, which loads the file its manifest names and checks it."""
        p = Path(where)
        if p.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (p / name).is_file():
                    return cls.load(p / name)
            raise UserError(f"{p}: no tokenizer.model or tokenizer.json")
        if not p.is_file():
            raise UserError(f"{p}: no such tokenizer file")
        cfg_path = p.parent / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(cfg, dict):
            raise UserError(f"{cfg_path}: expected a JSON object")
        explicit_bos = cfg.get("add_bos_token")
        if explicit_bos is not None and not isinstance(explicit_bos, bool):
            raise UserError(f"{cfg_path}: field 'add_bos_token': expected true or false, got {explicit_bos!r}")
        if p.suffix == ".json":
            return cls._load_json(p, cfg, explicit_bos)
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(p))
        except Exception as e:
            raise UserError(f"{p}: not a sentencepiece model: {e}") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        bos = bos if bos >= 0 else None
        add_bos = (explicit_bos if explicit_bos is not None else True) and bos is not None  # LlamaTokenizer's default
        return cls("sentencepiece", sp, bos, eos if eos >= 0 else None, p, add_bos)

    @classmethod
    def _load_json(cls, p: Path, cfg: dict, explicit_bos: bool | None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tk = HFTokenizer.from_file(str(p))
        except Exception as e:
            raise UserError(f"{p}: not a tokenizers JSON file: {e}") from None

        def token_id(key):
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return tk.token_to_id(t) if isinstance(t, str) else None

        bos = token_id("bos_token")
        if explicit_bos is not None:
            add_bos = explicit_bos and bos is not None
        else:  # what the post-processor does to a plain text
            with_specials = tk.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and len(with_specials) > 1 and with_specials[0] == bos
        return cls("tokenizers", tk, bos, token_id("eos_token"), p, add_bos)

    @classmethod
    def for_export(cls, folder: str | Path, manifest) -> "Tokenizer":
        """The tokenizer file an export's manifest names, checked against it: the file's sha256 (with the
        other files, runtime/integrity.py), its vocabulary size and special ids. Another model's tokenizer
        dropped into the folder is refused instead of printing garbage."""
        folder = Path(folder)
        rec = manifest.tokenizer
        where = folder / "manifest.json"
        tok = cls.load(folder / rec["file"])
        tok.add_bos = rec["add_bos"]
        if tok.vocab_size != rec["vocab_size"]:
            raise UserError(f"{tok.path}: {tok.vocab_size} tokens, {where} says tokenizer.vocab_size "
                            f"{rec['vocab_size']}: not this model's tokenizer")
        for name, mine, theirs in (("bos_token_id", tok.bos_id, manifest.bos_token_id),
                                   ("eos_token_id", tok.eos_id, manifest.eos_token_id)):
            if mine is None or theirs is None or theirs == []:
                continue
            if (mine not in theirs) if isinstance(theirs, list) else (mine != theirs):
                raise UserError(f"{tok.path}: its {name.split('_')[0]} token is id {mine}, {where} says "
                                f"{name} {theirs}: not this model's tokenizer")
        return tok

    @property
    def vocab_size(self) -> int:
        return self.impl.get_piece_size() if self.kind == "sentencepiece" else self.impl.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, specials: bool = False) -> np.ndarray:
        """specials=True lets tokenizer.json's special tokens written as text (e.g. "<|im_start|>") become
        their ids: only for text the program itself wrote. User text is encoded with specials=False."""
        check_text(text)
        if self.kind == "sentencepiece":
            ids = self.impl.encode(text)
        elif specials:
            ids = self.impl.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_plain(text)
        if bos:
            if self.bos_id is None:
                raise UserError(f"{self.path}: this tokenizer has no BOS token")
            return np.concatenate([[self.bos_id], np.asarray(ids, np.int64)]).astype(np.int64)
        return np.asarray(ids, dtype=np.int64)

    def _encode_plain(self, text: str) -> np.ndarray:
        """User text: added tokens written in it stay text. Why a second tokenizers object, set up once for that:
        flipping `encode_special_tokens` on a shared one races with another thread's encode ("Already borrowed").
        Why `encode_batch`: it releases the GIL while it encodes (`encode` holds it: 2 s for 3.5 MB), so a server's
        event loop goes on. Why pieces: what needs the GIL afterwards (the ids as Python ints, freeing the Encoding)
        grows with the piece, 50-70 ms for 3.5 MB whole; a piece of ENCODE_PIECE characters takes well under 1 ms."""
        parts = [np.asarray(self._plain.encode_batch([p], add_special_tokens=False)[0].ids, np.int64)
                 for p in self._pieces(text)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _pieces(self, text: str) -> list[str]:
        """A long text as pieces of about ENCODE_PIECE characters, cut only where GPT-2's byte-level pre-tokenizer
        cuts anyway, so the ids are the whole text's (tests/test_tokenizer_chat.py): see CUT. Other tokenizer.json
        kinds go whole, and so does a run without such a place (one script, no spaces, no punctuation)."""
        if len(text) <= ENCODE_PIECE or not self._byte_level():
            return [text]
        out, a = [], 0
        while len(text) - a > ENCODE_PIECE and (m := CUT.search(text, a + ENCODE_PIECE)):
            out.append(text[a:m.start()])
            a = m.start()
        return out + [text[a:]]

    def _byte_level(self) -> bool:
        if not hasattr(self, "_is_byte_level"):
            from tokenizers import pre_tokenizers

            pre = self.impl.pre_tokenizer
            self._is_byte_level = (self.impl.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel)
                                   and pre.use_regex and not pre.add_prefix_space)
        return self._is_byte_level

    def special_tokens(self) -> dict[str, tuple[int, bool, bool]]:
        """Special tokens written as text -> (id, lstrip, rstrip): what a chat template may emit."""
        if self.kind == "sentencepiece":
            sp = self.impl
            return {sp.id_to_piece(i): (i, False, False) for i in range(sp.get_piece_size()) if sp.is_control(i)}
        return {t.content: (i, bool(t.lstrip), bool(t.rstrip))
                for i, t in self.impl.get_added_tokens_decoder().items() if t.special}

    def encode_segments(self, segments: list[tuple[str, bool]]) -> list[int]:
        """Ids of a text assembled from pieces: (text, False) from the program (a chat template's markup,
        whose special tokens become their ids) and (text, True) from the user (always text).

        Cut at the program's special tokens, each stretch of text between two of them is encoded as one
        plain text, which is what tokenizers itself does with a whole string (it splits at added tokens
        first), so benign input gives exactly the ids of a plain encode with specials."""
        specials = self.special_tokens()
        # longest first, so "<|im_start|>" wins over a shorter token it contains
        names = sorted(specials, key=len, reverse=True)
        ids: list[int] = []
        text = ""
        strip_next = False
        for chunk, from_user in segments:
            if from_user:
                text += chunk
                continue
            i = 0
            while i < len(chunk):
                name = next((n for n in names if chunk.startswith(n, i)), None)
                if name is None:
                    text += chunk[i]
                    i += 1
                    continue
                tid, lstrip, rstrip = specials[name]
                if strip_next:
                    text = text.lstrip()
                if lstrip:
                    text = text.rstrip()
                if text:
                    ids += self.encode(text).tolist()
                ids.append(tid)
                text, strip_next = "", rstrip
                i += len(name)
        if strip_next:
            text = text.lstrip()
        if text:
            ids += self.encode(text).tolist()
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.impl.decode(ids)
        return self.impl.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.impl.id_to_piece(int(i)) if self.kind == "sentencepiece" else self.impl.id_to_token(int(i))

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in decoded text (computed once): sentencepiece's "▁" is a space and "<0xAB>" the byte
        AB; GPT-2 byte-level BPE maps each character of a token back to one byte (GPT-2's bytes_to_unicode table);
        other tokenizer.json kinds as sentencepiece's pieces; a special token, its name. Unlike decode([id]), a
        sentencepiece word keeps its leading space: what a token adds in the middle of a text."""
        if getattr(self, "_token_bytes", None) is None:
            table = ({c: b for b, c in _bytes_to_unicode().items()}
                     if self.kind == "tokenizers" and self._byte_level() else None)
            out, special = [], self.special_ids()
            for i in range(self.vocab_size):
                piece = self.id_to_piece(i) or ""
                if i in special:
                    out.append(piece.encode())
                elif table is not None and all(c in table for c in piece):
                    out.append(bytes(table[c] for c in piece))
                elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    out.append(bytes([int(piece[3:5], 16)]))
                else:
                    out.append(piece.replace("\u2581", " ").encode())
            self._token_bytes = out
        return self._token_bytes

    def special_ids(self) -> set[int]:
        """Every id is_special() is true of, found once (tokenizers' added-token table is rebuilt per call)."""
        if self.kind == "sentencepiece":
            return {i for i in range(self.vocab_size) if self.impl.is_control(i)}
        return {i for i, t in self.impl.get_added_tokens_decoder().items() if t.special}

    def is_special(self, i: int) -> bool:
        if self.kind == "sentencepiece":
            return self.impl.is_control(int(i))
        t = self.impl.get_added_tokens_decoder().get(int(i))
        return bool(t and t.special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (as in its encoder.py and tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def check_text(text: str, what: str = "text") -> str:
    """Text from a command line or stdin may hold bytes that are not UTF-8 (Python keeps them as lone
    surrogates); a tokenizer cannot encode those: one line instead of a TypeError deep inside it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        if "\udc80" <= c <= "\udcff":  # a byte that was not UTF-8, kept by surrogateescape (argv, stdin)
            bad = c.encode("utf-8", "surrogateescape").hex()
            raise UserError(f"{what}: not valid UTF-8 (byte 0x{bad} at character {e.start})") from None
        # a lone surrogate, e.g. JSON's "\ud800" escape: no UTF-8 encodes it
        raise UserError(f"{what}: not valid UTF-8 (a lone surrogate U+{ord(c):04X} at character {e.start})") from None
    return text


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


def stop_at(text: str, stops) -> int | None:
    """Where the text ends at the first stop string it holds (the earliest of any), or None."""
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def stop_holdback(text: str, stops) -> int:
    """How many characters at the end of `text` begin a stop string: a streamed reply holds them back until the
    next text shows whether the stop string follows (then they are never sent) or not."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
