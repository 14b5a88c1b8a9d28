"""Speculative decoding with prompt-lookup drafts: more tokens per pass over the weights, the same output.

A decode step reads every weight once for one token per sequence; on a memory-bound CPU (or GPU) feeding k + 1
tokens costs about the same read. So each step feeds the last token plus up to k drafted ones, and keeps the
longest prefix of the drafts that the model itself would have produced, plus the model's own next token:
between 1 and k + 1 tokens per step. Drafts come from the text itself (prompt lookup, Saxena 2023; vLLM's
ngram speculator): the last n tokens are looked up earlier in the prompt and the output so far, and the k tokens
that followed them there are proposed. Where the output quotes or edits its input (summaries, rewrites, code
edits, answers from a document) they come true often; in open chat rarely, and a step with no draft is a plain
decode step.

    index = NgramIndex(prompt)                 # updated with every accepted token
    drafts = index.draft(k=7)                  # [] when the last tokens occur nowhere before
    tokens = accept(logits[:len(drafts) + 1], drafts, sampling, rng, seen, generated)   # 1 .. len(drafts) + 1

Exactness: greedy keeps a draft only where it is the argmax, so greedy output is plain greedy decoding's (where the
kernels give a step of several tokens the logits of one-token steps: float graphs; not MatMulNBits, see
exactness_note). With
sampling, a draft d (a deterministic proposal: q = 1 at d) is kept with probability p(d) and otherwise the token is
drawn from p without d, renormalised: the standard speculative acceptance rule (Leviathan et al. 2023,
Chen et al. 2023) with a point-mass draft, so every token's distribution is exactly p's. The rejected drafts'
keys and values are rolled back in the cache (runtime/cache.py's InPlaceCache.rollback), which needs rows that
advance independently: the fused graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .manifest import NBITS_PRECISIONS
from .sampling import TokenMask, draw, probabilities, transformed

NGRAM_MAX = 3  # the longest tail looked up (then shorter ones, down to NGRAM_MIN)
NGRAM_MIN = 1
DEFAULT_K = 2 * NGRAM_MAX + 1  # drafts per step at most: draft_lengths' longest
FLOAT_LENGTHS = (3, 5, 7)  # tokens drafted after a match of 1, 2, 3 tokens (2n + 1): float weights
NBITS_LENGTHS = (0, 2, 6)  # the same for MatMulNBits exports, whose several-token steps cost more (draft_lengths)


def exactness_note(manifest) -> str | None:
    """Why speculation may change this export's greedy output, or None where it cannot. A step of several tokens
    computes each token's floats in another order than a step of one (attention and norm kernels over more rows):
    last-bit differences (3e-5 in a logit on the float graphs, every argmax kept). onnxruntime's MatMulNBits
    (int8-w8a8-dynamic, int4, and int4-w4a16, whose int4 DequantizeLinear -> MatMul onnxruntime fuses into it)
    rounds each activation block to int8, and a last-bit difference that moves one rounding moves the logits: up to
    0.5-0.7 on the demo's int8 and int4 exports (one kernel on its own gives equal rows), enough to change a greedy
    token now and then."""
    name = (manifest.precision or {}).get("name")
    if name in NBITS_PRECISIONS or name == "int4-w4a16":
        return (f"note: --speculate on {name} exports is not token-identical to plain decoding: onnxruntime's "
                "MatMulNBits rounds activations to int8, so the last-bit differences of a several-token step can "
                "change a greedy token")
    return None


def auto_speculation(gen, prompt_len: int, max_new_tokens: int) -> "Speculation | None":
    """`generate`'s and `chat`'s default (`--speculate auto`): prompt-lookup speculation where it is lossless and
    measured faster, plain decoding (None) elsewhere. `gen`: the runtime's Generator.

    - lossless: rows that roll back independently (the fused graph) and float weights (no `quantize` precision:
      MatMulNBits exports are not token-identical, exactness_note);
    - measured faster: fp32 on onnxruntime's CPU provider, in every workload `bench-speculate` runs (docs/results.md).
      fp16 and the GPU providers are not measured, so plain;
    - no larger cache: speculation keeps the whole sequence (a rollback must never meet a window's eviction), so
      with a sliding window only a request that fits plain decoding's trimmed cache (window plus one chunk).

        >>> auto_speculation(Generator(open_backend("build/onnx/smollm2-135m-instruct-fused-fp32")), 20, 128)
        Speculation(k=7, ngram_max=3, ngram_min=1)
    """
    b, spec = gen.backend, Speculation()
    m = b.manifest
    if not b.ragged or m.dtype != "fp32" or m.precision or b.provider != "CPUExecutionProvider":
        return None
    if gen.keep is not None and prompt_len + max_new_tokens + spec.k > gen.keep + gen.chunk:
        return None
    return spec


def draft_lengths(manifest) -> tuple[int, ...]:
    """How many tokens to draft after a match of the last 1, 2 or 3 tokens, for this export: (3, 5, 7) (2n + 1),
    or (0, 2, 6) for MatMulNBits weights (int8-w8a8-dynamic, int4).

    A longer match predicts its continuation more often, and every drafted token costs part of a step: a wrong draft
    is paid for, a kept one saves a step. How much it costs depends on the weights. A float MatMul streams its
    weights once for any few rows, so a few more rows cost little. MatMulNBits' one-token step is a cheap read of 8-
    or 4-bit weights, but each further row is compute (its activations quantized, then integer dot products), so
    a 1-token match's drafts, kept least often, cost more than they save: none are made, and 3-token matches draft
    6, not 7. The step costs and keep rates behind both tables, and the tables compared: docs/performance.md."""
    return NBITS_LENGTHS if (manifest.precision or {}).get("name") in NBITS_PRECISIONS else FLOAT_LENGTHS


MAX_K = 16  # the most drafts a step may carry


@dataclass(frozen=True)
class Speculation:
    """`generate --speculate ngram[:k]`: up to k drafted tokens per step (draft_lengths: 3, 5 or 7 after a match of
    1, 2 or 3 tokens; 0, 2 or 6 on MatMulNBits exports), from n-grams of 3 down to 1."""

    k: int = DEFAULT_K
    ngram_max: int = NGRAM_MAX
    ngram_min: int = NGRAM_MIN

    @staticmethod
    def parse(text: str) -> "Speculation":
        """'ngram' or 'ngram:K' (1 <= K <= MAX_K)."""
        kind, _, k = text.partition(":")
        if kind != "ngram" or (k and not (k.isdigit() and 1 <= int(k) <= MAX_K)):
            raise UserError(f"--speculate {text!r}: expected ngram or ngram:K with K in 1..16 (drafted tokens per step)")
        return Speculation(k=int(k) if k else DEFAULT_K)


class NgramIndex:
    """The latest earlier position of every n-gram (n in ngram_min..ngram_max) of a token sequence, kept as the
    sequence grows, so a lookup is a dict access per n, not a scan.

        >>> ix = NgramIndex([5, 6, 7, 8, 5, 6])
        >>> ix.draft(3)          # "5 6" occurred at 0, followed by 7 8 5
        [7, 8, 5]
    """

    def __init__(self, tokens, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        self.seq: list[int] = []
        self.nmax, self.nmin = ngram_max, ngram_min
        self.where: dict[tuple, int] = {}  # n-gram -> its latest start that has a token after it
        for t in tokens:
            self.append(int(t))

    def append(self, token: int) -> None:
        seq = self.seq
        seq.append(token)
        end = len(seq) - 1  # the n-grams ending just before the new token now have a follower
        for n in range(self.nmin, self.nmax + 1):
            if end - n >= 0:
                self.where[tuple(seq[end - n:end])] = end - n

    def draft(self, k: int, lengths: tuple[int, ...] = FLOAT_LENGTHS) -> list[int]:
        """What followed the latest earlier occurrence of the longest matching tail (n tokens): up to
        min(k, lengths[n - 1]) tokens (draft_lengths)."""
        seq = self.seq
        for n in range(self.nmax, self.nmin - 1, -1):
            if len(seq) < n:
                continue
            at = self.where.get(tuple(seq[len(seq) - n:]))
            if at is not None:
                return seq[at + n:at + n + min(k, lengths[n - 1])]
        return []


def accept(logits: np.ndarray, drafts: list[int], sampling, rng: np.random.Generator, seen: list[int],
           generated: list[int], mask: TokenMask | None = None) -> list[int]:
    """logits [len(drafts) + 1, V]: column i predicts the token after drafts[:i]. Returns the tokens this step
    yields: the accepted drafts, then one token of the model's own (a correction, or the bonus after all k).
    `mask`: the tokens allowed at each position, asked after each kept token (a draft it forbids has p = 0: never
    kept), and told every token kept."""
    out: list[int] = []
    for i in range(len(drafts) + 1):
        allowed = mask.allowed() if mask is not None else None
        x = transformed(logits[i:i + 1], sampling, [seen + out], [generated + out],
                        None if allowed is None else allowed[None])[0]
        d = drafts[i] if i < len(drafts) else None
        if sampling.greedy:
            t = int(x.argmax())
        else:
            p = probabilities(x[None], sampling)[0]
            if d is not None and rng.random() < p[d]:
                t = d
            else:
                if d is not None:  # rejected (so p[d] < 1): the residual max(0, p - q), q a point mass at d
                    p = p.copy()
                    p[d] = 0.0
                    p /= p.sum()
                t = draw(p, rng)
        out.append(t)
        if mask is not None:
            mask.accept(t)
        if t != d:
            return out
    return out
