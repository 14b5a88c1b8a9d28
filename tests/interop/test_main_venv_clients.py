"""onnxruntime-genai and transformers 5's AutoTokenizer on our export folder, as written (no edits)."""
from __future__ import annotations

import json

import onnxruntime_genai as og
from transformers import AutoTokenizer


def genai_greedy(model, ids, n):
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=len(ids) + n, do_sample=False)
    g = og.Generator(model, p)
    g.append_tokens(ids)
    out = []
    while not g.is_done():
        g.generate_next_token()
        out.append(int(g.get_next_tokens()[0]))
    return out


def test_onnxruntime_genai_loads_the_folder_and_gives_our_tokens(export_dir, ours):
    model = og.Model(str(export_dir))  # reads genai_config.json
    for text, (ids, want) in ours.items():
        got = genai_greedy(model, ids, 32)
        eos = json.loads((export_dir / "generation_config.json").read_text())["eos_token_id"]
        assert got[:len(want)] == want and (len(want) == 32 or got[len(want)] == eos), text


def test_auto_tokenizer_transformers_5_gives_our_ids(export_dir, ours):
    tok = AutoTokenizer.from_pretrained(export_dir)
    for text, (ids, _) in ours.items():
        assert tok(text).input_ids == ids, text
