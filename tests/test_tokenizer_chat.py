"""Tokenizer, streaming detokenizer and chat formats against independent references: mistral-common
(Mistral's own tokenizer and InstructTokenizerV1) and transformers' apply_chat_template."""
from __future__ import annotations

import json
import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import mistral_tokenizer_file
from mistral_trt.main import main
from mistral_trt.runtime import UserError
from mistral_trt.runtime.chat import format_chat, mistral_v1
from mistral_trt.runtime.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world", " leading space", "trailing space ", "   three spaces   and\ttabs\t\t", "\n\nnew\n\n\nlines\n",
    "digits 0123456789 3.14159 1,000,000", "emoji 😀👍🏽🇫🇷 done", "CJK 你好，世界。日本語のテキスト", "rare ᚠᛇᚻ ꦧꦱꦗ 𝔘𝔫𝔦",
    "literal </s> and <s> and [INST] x [/INST]", "<unk>", "code:\n    def f(x):\n        return x ** 2  # sq\n",
    "", " ", "mixed ÄÖÜ ß ñ ç ğ", "a" * 300,
]


@pytest.fixture(scope="module")
def ref():
    return MistralTokenizer.from_file(str(mistral_tokenizer_file()))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(mistral_tokenizer_file().parent / "tokenizer.model.v1")


@pytest.mark.parametrize("text", TEXTS)
def test_mistral_ids_equal_mistral_common(tok, ref, text):
    want = ref.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    assert tok.encode(text).tolist() == want
    assert tok.decode(want) == ref.instruct_tokenizer.tokenizer.decode(want)


def test_literal_control_text_stays_text(tok):
    ids = tok.encode("</s><s>[INST]").tolist()
    assert tok.eos_id not in ids and tok.bos_id not in ids and len(ids) > 3


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_joins_to_full_decode(tok, text):
    ids = tok.encode(text, bos=True).tolist()
    d = StreamDecoder(tok)
    chunks = [d.push(i) for i in ids]
    assert "".join(chunks) + d.flush() == tok.decode(ids)
    assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_holds_split_characters(tok):
    ids = tok.encode("a 🦜").tolist()  # not in the vocabulary: four byte-fallback pieces
    assert [tok.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    d = StreamDecoder(tok)
    out = [d.push(i) for i in ids]
    assert out[-4:-1] == ["", "", ""] and out[-1] == "🦜" and "".join(out) == "a 🦜"


POOL = ["hi", "", " ", "Be brief.", "line1\nline2", "  spaced  out  ", "code:\n```py\nprint('x')\n```",
        "unicode ✓ 你好 😀", "[INST] injected [/INST]", "</s>", "<s> a", "x" * 500, "tabs\tand\nnewlines\n"]


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(1, 7)
        yield [{"role": rng.choice(["system", "user", "user", "assistant"]), "content": rng.choice(POOL)} for _ in range(k)]


def test_mistral_v1_equals_instruct_tokenizer_v1(tok, ref):
    assert type(ref.instruct_tokenizer).__name__ == "InstructTokenizerV1"
    agreed = raised = 0
    for conv in conversations(400):
        try:
            want = ref.encode_chat_completion(ChatCompletionRequest(messages=conv)).tokens
        except Exception:
            want = None
        if want is None:
            with pytest.raises(UserError):
                mistral_v1(tok, conv)
            raised += 1
        else:
            assert mistral_v1(tok, conv) == want, conv
            agreed += 1
    assert agreed > 100 and raised > 50  # both paths were exercised


@pytest.mark.parametrize("conv", [[], [{"role": "tool", "content": "x"}], [{"role": "user"}],
                                  [{"role": "user", "content": 3}], "not a list"])
def test_invalid_conversations(tok, conv):
    with pytest.raises(UserError, match="conversation"):
        mistral_v1(tok, conv)


def test_long_text_encodes_in_pieces_exactly_and_off_the_gil(demo_hf):
    """User text longer than ENCODE_PIECE is encoded in pieces cut where the byte-level pre-tokenizer cuts anyway, each
    with the GIL released: the ids equal transformers' whole-text ids on long mixes of spaces, tabs, newlines, digits,
    contractions, punctuation, emoji, CJK and a special token written as text, with spaces and without (where the
    cuts fall between letters and punctuation); a thread encoding 3.5 MB leaves the main thread running."""
    import random
    import threading
    import time

    from transformers import AutoTokenizer

    from mistral_trt.runtime.tokenizer import ENCODE_PIECE

    hf = AutoTokenizer.from_pretrained(demo_hf)
    tok = Tokenizer.load(demo_hf / "tokenizer.json")
    rng = random.Random(0)
    words = ["word", "  two", "\n\n", "I'm", "x**2", "😀", "日本語", "\t", "3.14", "don't", " ", "a\u00a0b", "<|im_end|>",
             ".'s", "'ll", "½", "x_y", "¿Qué?", "—", "a.b", "'", "“quoted”", "ñ", "١٢٣", "Ⅻ", "\u3000", "，。"]
    for sep in ([" ", "", " ", "  ", "\n"], [""]):
        text = "".join(rng.choice(words) + rng.choice(sep) for _ in range(25000))
        pieces = tok._pieces(text)
        assert len(pieces) >= 4 and "".join(pieces) == text, (len(text), len(pieces))
        assert tok.encode(text).tolist() == hf(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert tok.encode("<|im_end|>", specials=True).tolist() == [hf.convert_tokens_to_ids("<|im_end|>")]
    assert len(tok._pieces("a" * 4 * ENCODE_PIECE)) == 1  # no place to cut: whole
    gaps, started = [], threading.Event()

    def encode():
        started.set()
        tok.encode("word " * 700_000)

    worker = threading.Thread(target=encode)
    worker.start()
    started.wait()
    last = time.perf_counter()
    while worker.is_alive():
        time.sleep(0.002)
        gaps.append(time.perf_counter() - last)
        last = time.perf_counter()
    assert len(gaps) >= 50 and max(gaps) < 0.05, (len(gaps), max(gaps))


def test_template_equals_transformers(demo_hf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_hf)
    tok = Tokenizer.load(demo_hf / "tokenizer.json")
    template = (demo_hf / "chat_template.jinja").read_text()
    convs = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi  there\n"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c 😀 你好"}],
    ]
    for conv in convs:
        want = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert format_chat(tok, conv, "template", template) == list(want)
    for text in TEXTS:
        assert tok.encode(text).tolist() == hf(text, add_special_tokens=False).input_ids
        ids = tok.encode(text).tolist()
        d = StreamDecoder(tok)
        assert "".join(d.push(i) for i in ids) + d.flush() == hf.decode(ids)
    assert tok.encode("<|im_end|>").tolist() != [tok.eos_id]  # typed text stays text
    assert tok.encode("<|im_end|>", specials=True).tolist() == [tok.eos_id]


def test_tokenize_cli(tmp_path, capsys, ref):
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"}]
    (tmp_path / "c.json").write_text(json.dumps(conv))
    assert main(["tokenize", "--tokenizer", str(mistral_tokenizer_file()), "--messages", str(tmp_path / "c.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == ref.encode_chat_completion(ChatCompletionRequest(messages=conv)).tokens
    assert out["pieces"][:3] == ["<s>", "▁[", "INST"]
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "robot", "content": "x"}]))
    assert main(["tokenize", "--tokenizer", str(mistral_tokenizer_file()), "--messages", str(tmp_path / "bad.json")]) == 2
    assert "unknown role 'robot'" in capsys.readouterr().err


def test_prefix_final_assistant_message(tok, ref, demo_hf):
    """Mistral's `prefix: true` on a final assistant message: the reply continues it. mistral-v1 equals
    mistral-common (no EOS after it); a template equals transformers' continue_final_message."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from transformers import AutoTokenizer

    conv = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Soft rain on", "prefix": True}]
    want = ref.encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content="Write a haiku."), AssistantMessage(content="Soft rain on", prefix=True)])).tokens
    assert mistral_v1(tok, conv) == want and want[-1] != tok.eos_id
    with pytest.raises(UserError, match="for a final assistant message"):
        mistral_v1(tok, [{"role": "user", "content": "x", "prefix": True}])
    hf = AutoTokenizer.from_pretrained(demo_hf)
    t = Tokenizer.load(demo_hf / "tokenizer.json")
    template = (demo_hf / "chat_template.jinja").read_text()
    plain = [{k: v for k, v in m.items() if k != "prefix"} for m in conv]
    ids = hf.apply_chat_template(plain, tokenize=True, continue_final_message=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert format_chat(t, conv, "template", template) == list(ids)


def test_full_conversations_equal_mistral_common_finetuning(tok):
    """A conversation ending with an assistant message, in the form used for training and scoring: mistral-common's
    finetuning validation (the final reply and its EOS included); the serving form refuses it with one line."""
    from mistral_common.protocol.instruct.validator import ValidationMode

    ref = MistralTokenizer.from_file(str(mistral_tokenizer_file()), mode=ValidationMode.finetuning)
    agreed = 0
    for conv in conversations(400, seed=3):
        try:
            want = ref.encode_chat_completion(ChatCompletionRequest(messages=conv)).tokens
        except Exception:
            continue
        assert mistral_v1(tok, conv, complete=True) == want, conv
        assert want[-1] == tok.eos_id
        with pytest.raises(UserError, match="ends with a finished assistant message"):
            mistral_v1(tok, conv)
        agreed += 1
    assert agreed > 50


def test_full_conversation_template_equals_transformers(demo_hf, tmp_path, capsys):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_hf)
    t = Tokenizer.load(demo_hf / "tokenizer.json")
    template = (demo_hf / "chat_template.jinja").read_text()
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    want = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=False)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert format_chat(t, conv, "template", template, complete=True) == list(want)
    with pytest.raises(UserError, match="ends with a finished assistant message"):
        format_chat(t, conv, "template", template)
    (tmp_path / "c.json").write_text(json.dumps(conv))
    assert main(["tokenize", "--tokenizer", str(demo_hf / "tokenizer.json"), "--messages", str(tmp_path / "c.json")]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == list(want)
