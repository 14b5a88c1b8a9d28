"""Greedy tokens of a fused export on whichever onnxruntime this interpreter has, as JSON on stdout (run by
test_onnxruntime_131.py under onnxruntime 1.31.1 and under the main venv's 1.32, the same code both times).

    python tests/ort131/greedy_run.py EXPORT_DIR LOGITS.npy      # + one prefill's logits, every position
"""
import json
import sys

import numpy as np
import onnxruntime as ort

from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.sampling import Sampling

backend = open_backend(sys.argv[1])
rng = np.random.default_rng(0)
# ragged prompts fed in chunks of 16: rows still prefilling beside rows already decoding
prompts = [rng.integers(3, backend.args.vocab_size, n).tolist() for n in (40, 7, 90)]
gen = Generator(backend, prefill_chunk=16)
steps = list(gen.generate(prompts, 24, Sampling(), stop_on_eos=False))
cache = backend.new_cache(1, 128)
cache.admit()
first = backend.step(cache, [prompts[2]], last=False)  # every position's logits of one prefill
np.save(sys.argv[2], first[0])
print(json.dumps({"onnxruntime": ort.__version__, "shared_width": backend.shared_width,
                  "tokens": np.stack(steps, 1).tolist()}))
