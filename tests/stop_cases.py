"""The stop-string cases every interface is tested on (the CLI, serve, Triton): from one greedy reference reply, the
stops that meet its tokens each way, and the text each must return. Streamed and returned text must both equal it.

    cases = stop_cases(text, ids, tok, ended_by_eos=True)
    for c in cases:   # c.name, c.stops, c.want (the text before the earliest stop), c.speculate
        ...
"""
from __future__ import annotations

from dataclasses import dataclass

GROUNDED = ("Repeat the following text exactly, word for word:\n\nThe quick brown fox jumps over the lazy dog. "
            "The quick brown fox jumps over the lazy dog again, and then the fox rests under the old oak tree.")


@dataclass
class StopCase:
    name: str
    stops: list[str]
    want: str  # the text returned (and streamed): the reference cut before the earliest stop
    speculate: bool = False  # run with prompt-lookup speculation (several tokens per step)


def piece_ends(ids: list[int], tok) -> set[int]:
    """Where in the decoded text each token's piece ends."""
    return {len(tok.decode(ids[:k])) for k in range(1, len(ids) + 1)}


def _unique(text: str, i: int, n: int) -> bool:
    s = text[i:i + n]
    return len(s) == n and text.find(s) == i and s.strip() == s and "\n" not in s and "\ufffd" not in s


def stop_cases(text: str, ids: list[int], tok, ended_by_eos: bool, speculate: bool = True) -> list[StopCase]:
    """spans tokens: a stop whose first characters end one piece and whose last begin the next; inside a piece: a
    stop after the first character of a piece and within it (the text before it in the same piece is returned);
    several stops: a later one listed first, the earliest wins; at EOS: the reply's last characters (the model ends
    right after them); with speculation: the spanning stop again, several tokens a step."""
    ends = piece_ends(ids, tok)
    middle = range(len(text) // 4, len(text) - 4)
    span = next(i for i in middle if _unique(text, i, 4) and any(i < e < i + 4 for e in ends))
    inside = next(i for i in middle if _unique(text, i, 2) and i not in ends and i + 1 not in ends
                  and any(e > i + 2 for e in ends))
    cases = [StopCase("spans tokens", [text[span:span + 4]], text[:span]),
             StopCase("inside a piece", [text[inside:inside + 2]], text[:inside])]
    a, b = sorted((span, inside))
    first, second = (text[span:span + 4], text[inside:inside + 2]) if a == span else (text[inside:inside + 2],
                                                                                     text[span:span + 4])
    cases.append(StopCase("several stops", [second, "never in this text \u2603", first], text[:a]))
    if ended_by_eos:
        tail = next(n for n in (3, 4, 5, 6) if text.find(text[-n:]) == len(text) - n)
        cases.append(StopCase("at EOS", [text[-tail:]], text[:-tail]))
    if speculate:
        cases.append(StopCase("with speculation", [text[span:span + 4]], text[:span], speculate=True))
    return cases
