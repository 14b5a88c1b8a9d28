"""The bar for every runtime and graph: greedy output on the demo model equals Hugging Face transformers' own
`generate`, token for token, 64 tokens for each of three chat prompts. The HF reference is computed once per session;
each runtime (Python, the C++ runtime) drives each graph (portable, fused) against it."""
from __future__ import annotations

import pytest
import torch
from transformers import MistralForCausalLM

from conftest import cpp_generate
from test_generate import ours
from mistral_trt.runtime.chat import format_chat
from mistral_trt.runtime.manifest import Manifest
from mistral_trt.runtime.tokenizer import Tokenizer

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child."]
NEW_TOKENS = 64


@pytest.fixture(scope="session")
def demo_prompts(demo_onnx) -> dict[str, list[int]]:
    """Each question as the runtime's chat formatter makes it."""
    tok, m = Tokenizer.load(demo_onnx), Manifest.load(demo_onnx)
    return {q: format_chat(tok, [{"role": "user", "content": q}], m.chat_format, m.chat_template) for q in QUESTIONS}


@pytest.fixture(scope="session")
def hf_reference(demo_hf, demo_prompts) -> dict[str, list[int]]:
    """HF `generate`, greedy, eager attention, fp32: the model loaded once, every prompt generated once."""
    model = MistralForCausalLM.from_pretrained(demo_hf, attn_implementation="eager").eval()
    out = {}
    with torch.no_grad():
        for q, prompt in demo_prompts.items():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            out[q] = ids[0, len(prompt):].tolist()
    return out


def cpp_greedy(cpp, folder, prompt: list[int]) -> list[int]:
    """Prompts come as ids (the demo's tokenizer.json has no C++ encoder); the reply's text is checked too: the C++
    runtime decodes byte-level BPE itself."""
    got = cpp_generate(cpp, folder, "--ids", ",".join(map(str, prompt)), "--max-new-tokens", NEW_TOKENS)
    assert got["text"] == Tokenizer.load(folder).decode(got["ids"])
    return got["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["portable", "fused"])
@pytest.mark.parametrize("runtime", ["python", "cpp"])
def test_demo_greedy_equals_hf_generate(runtime, graph, demo_onnx, demo_fused, demo_prompts, hf_reference, request):
    folder = demo_onnx if graph == "portable" else demo_fused
    if graph == "fused":  # the bar for an optimized graph: verify passed at export, every check
        m = Manifest.load(folder)
        assert all(r["passed"] for r in m.verification) and len(m.verification) == 4
    eos, longest = set(Manifest.load(folder).eos_token_id), 0
    for q, prompt in demo_prompts.items():
        want = hf_reference[q]
        if runtime == "python":  # the runtime decodes past EOS when asked to, as HF's reference does
            assert ours(folder, [prompt], NEW_TOKENS)[0].tolist() == want, q
        else:  # the C++ runtime stops at EOS: HF's tokens up to there, and HF's next token is that EOS
            got = cpp_greedy(request.getfixturevalue("cpp"), folder, prompt)
            assert got == want[:len(got)] and (len(got) == NEW_TOKENS or want[len(got)] in eos), q
            longest = max(longest, len(got))
    assert runtime == "python" or longest == NEW_TOKENS  # at least one reply compared over all 64 tokens
