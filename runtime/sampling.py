"""How the next token is chosen from a step's logits: the sampling parameters and their one set of rules, the
penalties, temperature / top-k / top-p, and a per-step token mask (structured outputs constrain decoding through it).

    s = Sampling(temperature=0.7, top_p=0.9, seed=1)
    rng = np.random.default_rng(s.seed)
    ids = sample(logits, s, rng, seen=[prompt + generated], generated=[generated])   # logits [B, V] -> [B]
    ids = sample(logits, s, rng, seen, generated, mask=allowed)                      # allowed [B, V] bool

Everything here is numpy on [B, V] logits; nothing depends on the model, the cache or the tokenizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import RequestError, UserError


def is_count(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


# One rule per sampling parameter (ranges as in HF's GenerationConfig and vLLM's SamplingParams), used by
# Sampling itself and by the CLI's argument parser, so a bad value gets one line naming it everywhere.
SAMPLING_RULES = {
    "temperature": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_p": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1] (1: off)"),
    "top_k": (lambda v: is_count(v) and v >= 0, "an integer >= 0 (0: off)"),
    "min_p": (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1] (0: off)"),
    "repetition_penalty": (lambda v: _is_real(v) and v > 0, "a finite number > 0 (1: off)"),
    "seed": (lambda v: v is None or (is_count(v) and 0 <= v < 2**64), "an integer in [0, 2**64)"),
    "frequency_penalty": (lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2] (0: off)"),
    "presence_penalty": (lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2] (0: off)"),
}


def check_sampling(name: str, value, label: str | None = None):
    ok, expected = SAMPLING_RULES[name]
    if not ok(value):
        raise UserError(f"{label or name} {value!r}: expected {expected}")
    return value


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 means greedy, as in every OpenAI-style API.

        Sampling()                                   # greedy
        Sampling(temperature=0.7, top_p=0.9, seed=1) # sampled
    """
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0: off; else a token needs at least min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # 1.0: off (HF's rule: divide positive logits, multiply negative ones)
    seed: int | None = None
    # OpenAI's rule, over the generated tokens only: logit[j] -= count[j] * frequency + (count[j] > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # OpenAI's logit_bias: token id -> a bias in [-100, 100] added to its logit before anything else (greedy too)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        for name in SAMPLING_RULES:
            check_sampling(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def build_sampling(params: dict, spell=lambda name: name, default_temperature: float = 1.0) -> Sampling:
    """Sampling from request fields (None or absent: left out) by SAMPLING_RULES; `spell` names a field the way the
    caller's interface does (runtime/request.py's Spelling). top_p and top_k shape sampling only, so at temperature
    0 (greedy) they are refused rather than ignored; a seed is kept (greedy is reproducible anyway, and clients send
    both)."""
    kw = {}
    for name, (ok, expected) in SAMPLING_RULES.items():
        v = params.get(name)
        if v is None:
            continue
        if isinstance(v, np.generic):
            v = v.item()
        if not ok(v):
            raise RequestError(name, f"{spell(name)} {v!r}: expected {expected}")
        kw[name] = v
    kw.setdefault("temperature", default_temperature)
    if kw["temperature"] == 0:
        for name, off in (("top_p", 1), ("top_k", 0)):
            if kw.get(name, off) != off:
                raise RequestError(name, f"{spell(name)} {kw[name]!r} applies to sampling: add {spell('temperature')} "
                                         f"T (T > 0); at temperature 0 decoding is greedy")
    return Sampling(**{k: (int(v) if k in ("top_k", "seed") else float(v)) for k, v in kw.items()})


class TokenMask(Protocol):
    """The tokens a request may take at each step (a grammar's matcher: structured outputs). The sequence asks
    `allowed()` before each token it samples and reports each token it keeps with `accept()`."""

    def allowed(self) -> np.ndarray | None:
        """bool [V]: the tokens allowed next; None: any."""
        ...

    def accept(self, token: int) -> None:
        ...

    def copy(self) -> "TokenMask":
        """The same constraint from its start, for another sequence (n > 1's choices)."""
        ...


def transformed(logits: np.ndarray, s: Sampling, seen: list[list[int]], generated: list[list[int]] | None = None,
                mask: np.ndarray | None = None) -> np.ndarray:
    """logits [B, V] -> float64 logits after the penalties and the mask. seen[b]: row b's prompt and generated ids
    (repetition penalty); generated[b]: its generated ids only (frequency and presence penalties); mask [B, V] bool:
    the tokens allowed next (the others get -inf, so neither argmax nor a draw can pick them)."""
    logits = logits.astype(np.float64)
    if s.logit_bias:
        ids = np.fromiter(s.logit_bias, np.int64)
        logits[:, ids] += np.fromiter(s.logit_bias.values(), np.float64)
    if s.repetition_penalty != 1.0:
        for b, ids in enumerate(seen):
            idx = np.unique(ids)
            v = logits[b, idx]
            logits[b, idx] = np.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    if (s.frequency_penalty or s.presence_penalty) and generated:
        for b, ids in enumerate(generated):
            if ids:
                idx, counts = np.unique(ids, return_counts=True)
                logits[b, idx] -= counts * s.frequency_penalty + s.presence_penalty
    if mask is not None:
        if not mask.any(-1).all():
            raise UserError("the token mask allows no token for the next step")
        logits[~mask] = -np.inf
    return logits


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Penalised logits [B, V] -> the distribution sampled from (temperature, min-p, top-k, top-p), float64."""
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the top logit to -inf: fine
        logits = (logits - logits.max(-1, keepdims=True)) / s.temperature  # <= 0, the max at 0: never NaN
    if s.min_p:  # p / p_max = exp(logit - max) after the temperature: below min_p is out (the top token never is)
        logits = np.where(logits < np.log(s.min_p), -np.inf, logits)
    if s.top_k:
        at = logits.shape[-1] - min(s.top_k, logits.shape[-1])  # where the k-th largest sits in ascending order
        kth = np.partition(logits, at, axis=-1)[:, [at]]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    if s.top_p < 1.0:
        mask = np.zeros(probs.shape, bool)
        for b, p in enumerate(probs):
            mask[b, nucleus(p, s.top_p)] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The ids of the smallest set of most likely tokens whose mass reaches top_p (p [V], summing to 1).

    Sorting all of p finds it too, but an argsort of 49k floats takes 3-4 ms, half a decode step of the demo's
    int8 export, while the set is usually a few dozen tokens. So only the tokens with p >= (1 - top_p) / 2V are
    sorted: the others hold less than (1 - top_p) / 2 together, so these hold more than top_p, and the set (a
    prefix of the descending order whose mass before its last token is < top_p) lies within them. The cumulative
    sums are the full sort's, term for term. A flat distribution keeps every token and costs the full sort.

        nucleus(np.array([0.1, 0.5, 0.15, 0.25]), 0.7)    # array([1, 3]): 0.5 + 0.25 >= 0.7
    """
    top = np.flatnonzero(p >= (1.0 - top_p) / (2 * p.shape[-1]))
    if p[top].sum() <= top_p:  # only where rounding eats the margin (top_p within 1e-16 x V of 1)
        top = np.arange(p.shape[-1])
    order = top[np.argsort(-p[top])]
    sorted_p = p[order]
    return order[np.cumsum(sorted_p) - sorted_p < top_p]


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from p [V]: rng.choice(V, p=p)'s draw (one uniform, the same cumulative sums at every nonzero
    entry, so the same token for the same generator state), over p's nonzero entries only, which after top-p or
    top-k are few, so a draw need not scan the whole vocabulary."""
    nz = np.flatnonzero(p)
    return int(nz[rng.choice(len(nz), p=p[nz])])


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator, seen: list[list[int]],
           generated: list[list[int]] | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """logits: [B, V] float -> next ids [B] (transformed(), then argmax or a draw from probabilities())."""
    logits = transformed(logits, s, seen, generated, mask)
    if s.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, s)
    return np.array([draw(p, rng) for p in probs])
