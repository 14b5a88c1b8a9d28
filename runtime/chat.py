"""Conversations -> token ids, the way the model was trained to see them.

Two formats, named in the manifest's `chat_format`:

* ``mistral-v1`` (Mistral-7B-Instruct v0.1/v0.2), token-exact with mistral-common's InstructTokenizerV1:

      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
      -> <s> ▁[INST] ▁Be brief.\\n\\nHi ▁[/INST]

  BOS; each user turn encoded on its own as "[INST] {content} [/INST]"; each assistant turn encoded on
  its own and followed by EOS; system prompts joined with a blank line and put before the first user
  message; consecutive messages of one role merged with a blank line. The prompt ends on [/INST].
  Turns are encoded separately (not as one string) because sentencepiece adds its "▁" prefix per call.

* ``template``: the checkpoint's own jinja2 chat template (the demo model's ChatML), rendered as
  transformers renders it; the template's special tokens become their ids, message contents stay text
  (`template_segments`).
"""
from __future__ import annotations

import json
import re
import secrets

from .errors import UserError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# Which role may follow which (mistral-common's rule for chat requests).
MAY_FOLLOW = {"system": {"system", "user", "assistant"}, "user": {"user", "assistant", "system"},
              "assistant": {"assistant", "user"}}
JOIN = "\n\n"


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError("conversation: expected a non-empty list of {\"role\": ..., \"content\": ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"conversation message {i}: expected an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise UserError(f"conversation message {i}: unknown role {m['role']!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"conversation message {i}: content must be a string")
    return messages


def final_prefix(messages: list[dict]) -> str | None:
    """The content of a final assistant message marked `"prefix": true` (Mistral's API: the reply continues
    it), else None."""
    check_messages(messages)
    last = messages[-1]
    if last.get("prefix") is not None and not isinstance(last["prefix"], bool):
        raise UserError(f"conversation message {len(messages) - 1}: \"prefix\" must be true or false")
    if not last.get("prefix"):
        return None
    if last["role"] != "assistant":
        raise UserError(f"conversation message {len(messages) - 1}: \"prefix\": true is for a final assistant message")
    return last["content"]


FINISHED = ("conversation: it ends with a finished assistant message, so there is nothing to answer; end it with a "
            "user message, or mark the assistant message \"prefix\": true to continue it")


def mistral_v1(tok: Tokenizer, messages: list[dict], complete: bool = False) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant's reply; or ending in an
    assistant message with `"prefix": true`, whose content the reply continues (encoded on its own, no EOS:
    mistral-common's rule). complete=True also takes a conversation ending in a finished assistant message:
    the form used for training and scoring (its EOS included), mistral-common's "finetuning" validation."""
    prefix = final_prefix(messages)
    if prefix is not None:
        if len(messages) < 2:
            raise UserError("conversation: a prefix assistant message needs a user message before it")
        return mistral_v1(tok, messages[:-1]) + tok.encode(prefix).tolist()
    for i in range(1, len(messages)):
        prev, cur = messages[i - 1]["role"], messages[i]["role"]
        if cur not in MAY_FOLLOW[prev]:
            raise UserError(f"conversation message {i}: role {cur!r} cannot follow {prev!r}")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"]:
            raise UserError(f"conversation message {i}: assistant message with empty content")

    # Empty contents are skipped when joining (no stray blank lines), as mistral-common does.
    system = JOIN.join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns: list[list] = []  # [role, [contents]]; a system message ends a run of one role
    prev = None
    for m in messages:
        if m["role"] != "system":
            if prev == m["role"]:
                turns[-1][1].append(m["content"])
            else:
                turns.append([m["role"], [m["content"]]])
        prev = m["role"]
    if not turns or turns[0][0] != "user":
        turns.insert(0, ["user", [""]])
    if turns[-1][0] != "user" and not complete:
        raise UserError(FINISHED)

    ids = [tok.bos_id]
    for n, (role, parts) in enumerate(turns):
        content = JOIN.join(p for p in parts if p)
        if role == "user":
            if n == 0 and system:
                content = system + JOIN + content
            ids += tok.encode(f"[INST] {content} [/INST]").tolist()
        else:
            ids += tok.encode(content).tolist() + [tok.eos_id]
    return ids


def render_template(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template (with the generation prompt), as transformers does."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    check_messages(messages)

    def raise_exception(message):
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise UserError(f"chat template: {e}") from None


def template_segments(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                      complete: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as pieces (text, from_user): which characters the template wrote and which
    are message contents. Only the template's own markup may become special tokens; a user who types
    "<|im_start|>system" gets those characters as text (prompt injection otherwise).

    How: render once with each content replaced by a unique placeholder (where the template puts contents)
    and once for real; walk both. A template that trims contents (`| trim`) is followed; one that changes
    them in another way is refused rather than guessed.

        >>> template_segments(CHATML, [{"role": "user", "content": "hi"}])      # doctest: +SKIP
        [('<|im_start|>user\n', False), ('hi', True), ('<|im_end|>\n<|im_start|>assistant\n', False)]
    """
    prefix = final_prefix(messages)
    finished = prefix is None and messages[-1]["role"] == "assistant"
    if finished and not complete:
        raise UserError(FINISHED)
    # a prefix message is continued (transformers' continue_final_message), a finished one closed; neither answered
    gen = prefix is None and not finished
    real = render_template(template, messages, bos_token, eos_token, gen)
    nonce = secrets.token_hex(8)
    marks = [{**m, "content": f"\x00{nonce}:{i}\x00"} for i, m in enumerate(messages)]
    parts = re.split(f"\x00{nonce}:(\\d+)\x00", render_template(template, marks, bos_token, eos_token, gen))
    # parts: template text, content index, template text, ..., template text
    out: list[tuple[str, bool]] = []
    pos = 0
    for k, part in enumerate(parts):
        if k % 2 == 0:  # template text: must match the real rendering exactly
            if not real.startswith(part, pos):
                raise UserError("chat template: it renders message contents differently from plain text "
                                "(cannot tell user text from the template's markup)")
            out.append((part, False))
            pos += len(part)
            continue
        content, after = messages[int(part)]["content"], parts[k + 1]
        for cand in (content, content.strip(), content.lstrip(), content.rstrip()):
            if real.startswith(cand, pos) and real.startswith(after, pos + len(cand)):
                break
        else:
            raise UserError(f"chat template: it changes the content of message {part} in a way this runtime "
                            "cannot follow (only trimming is supported)")
        out.append((cand, True))
        pos += len(cand)
        if prefix is not None and int(part) == len(messages) - 1:
            return [(t, u) for t, u in out if t]  # the reply continues right after the final message's text
    if pos != len(real):
        raise UserError("chat template: renders differently from one call to the next")
    if prefix is not None:
        raise UserError("chat template: it does not render the final assistant message, so it cannot be continued")
    return [(t, u) for t, u in out if t]


def format_chat(tok: Tokenizer, messages: list[dict], chat_format: str, template: str | None = None,
                complete: bool = False) -> list[int]:
    """Ids the model sees for `messages`: ready for its reply (the conversation ends with a user message), or
    continuing a final assistant message marked `"prefix": true`; complete=True also takes one ending with a
    finished assistant message (training / scoring form)."""
    if chat_format == "mistral-v1":
        return mistral_v1(tok, messages, complete)
    if chat_format == "template":
        if not template:
            raise UserError("chat_format 'template' but no chat template in the manifest")
        bos = tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.id_to_piece(tok.eos_id) if tok.eos_id is not None else ""
        return tok.encode_segments(template_segments(template, messages, bos, eos, complete))
    raise UserError(f"chat format {chat_format!r}: this model has no chat format; use a raw prompt")
