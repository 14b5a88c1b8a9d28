"""One validation table, run against the CLI (tests/test_serve.py), the HTTP API (there too) and Triton
(tests/triton_server/test_triton.py): each bad request must be refused by all three with the same message once each
interface's spelling of the field is mapped back to runtime/request.py's canonical name.

Values are ones every interface carries exactly (Triton's FP32 and INT32 inputs included).
"""
from __future__ import annotations

import re

# (canonical fields beyond a one-word user message, a fragment the message must hold); greedy unless temperature given
CASES = [
    ({"temperature": -1.0}, "temperature -1.0: expected a finite number >= 0 (0: greedy)"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p 1.5: expected a number in (0, 1] (1: off)"),
    ({"temperature": 0.0, "top_p": 0.5}, "top_p 0.5 applies to sampling: add temperature T (T > 0)"),
    ({"temperature": 1.0, "top_k": -5}, "top_k -5: expected an integer >= 0 (0: off)"),
    ({"temperature": 0.0, "top_k": 5}, "top_k 5 applies to sampling"),
    ({"temperature": 0.0, "repetition_penalty": 0.0}, "repetition_penalty 0.0: expected a finite number > 0"),
    ({"temperature": 0.0, "frequency_penalty": 3.0}, "frequency_penalty 3.0: expected a number in [-2, 2]"),
    ({"temperature": 0.0, "presence_penalty": -2.5}, "presence_penalty -2.5: expected a number in [-2, 2]"),
    ({"temperature": 0.0, "max_tokens": 0}, "max_tokens 0: expected an integer >= 1"),
    ({"temperature": 0.0, "max_tokens": 1000000}, "max_tokens 1000000: the context limit is"),
    ({"temperature": 0.0, "stop": [""]}, "stop: expected a non-empty string or a list of 1 to 16 of them"),
]
ACCEPTED = [  # the same rules say yes: each interface answers
    {"temperature": 0.0, "max_tokens": 2},
    {"temperature": 0.0, "max_tokens": 2, "top_p": 1.0, "top_k": 0, "seed": 7},  # the values that mean off
    {"temperature": 0.5, "max_tokens": 2, "top_p": 0.9, "top_k": 40, "seed": 7, "repetition_penalty": 1.1,
     "frequency_penalty": 0.5, "presence_penalty": -0.5, "stop": ["\n\n"]},
]

CLI_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
             "repetition_penalty": "--repetition-penalty", "frequency_penalty": "--frequency-penalty",
             "presence_penalty": "--presence-penalty", "seed": "--seed", "max_tokens": "--max-new-tokens",
             "stop": "--stop"}


def cli_args(fields: dict) -> list[str]:
    out = []
    for k, v in fields.items():
        for x in (v if isinstance(v, list) else [v]):
            out += [CLI_FLAGS[k], str(x)]
    return out


def canonical(message: str) -> str:
    """A message with the CLI's flags and Triton's input names put back to the canonical field names."""
    for name, flag in CLI_FLAGS.items():
        message = re.sub(rf"{re.escape(flag)}(?![\w-])", name, message)
    message = re.sub(r"input '(\w+)'", r"\1", message)
    return message.strip()


def context_free(message: str) -> str:
    """The context limit differs by interface (the model's, a server's --max-context): compare without it."""
    return re.sub(r"the context limit is \d+ positions.*", "the context limit is N positions", message)
