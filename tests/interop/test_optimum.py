"""optimum's ORTModelForCausalLM and transformers 4.x's AutoTokenizer on our export folder, as written (runs in
its own venv: optimum needs transformers < 4.58)."""
from __future__ import annotations

import pytest
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer


@pytest.mark.parametrize("io_binding", [False, True])
def test_optimum_loads_the_folder_and_gives_our_tokens(export_dir, ours, io_binding):
    model = ORTModelForCausalLM.from_pretrained(export_dir, use_io_binding=io_binding)
    assert model.use_cache  # our KV-cache inputs are found and used
    for text, (ids, want) in ours.items():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out[:len(want)] == want and (len(want) == 32 or out[len(want)] == model.config.eos_token_id), text


def test_auto_tokenizer_transformers_4_gives_our_ids(export_dir, ours):
    import transformers

    assert transformers.__version__.startswith("4.")
    tok = AutoTokenizer.from_pretrained(export_dir)
    for text, (ids, _) in ours.items():
        assert tok(text).input_ids == ids, text
