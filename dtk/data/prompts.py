"""Prompt lists, read one way by every command: plain text (one prompt per line, ``#`` comments and blank
lines skipped) or JSON Lines (``prompt`` / ``negative_prompt`` / ``seed``, as `dtk sample` prints)."""

from __future__ import annotations

from dataclasses import dataclass

from dtk.errors import BadInput
from dtk.io import open_text, parse_jsonl


@dataclass
class PromptItem:
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None


NO_PROMPTS = "no prompts: give them as arguments or with --prompts FILE (- for stdin)"


def read_prompts(texts: tuple[str, ...] | list[str], prompts_file: str | None, required: bool = True) -> list[PromptItem]:
    """Prompts from arguments, or from a plain-text / JSONL file (``-`` = stdin); none at all is an
    error unless not ``required`` (an unconditional model needs none)."""
    if texts and prompts_file:
        raise BadInput("give prompts as arguments or with --prompts, not both")
    if texts:
        return [PromptItem(t) for t in texts]
    if not prompts_file:
        if required:
            raise BadInput(NO_PROMPTS)
        return []
    name = "<stdin>" if prompts_file == "-" else prompts_file
    try:
        with open_text(prompts_file) as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise BadInput(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    items: list[PromptItem] = []
    if first.startswith("{"):
        for lineno, obj in parse_jsonl(lines, name):
            prompt = obj.get("prompt", obj.get("caption"))
            if not isinstance(prompt, str):
                raise BadInput(f"{name}:{lineno}: no 'prompt' string")
            seed = obj.get("seed")
            if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2 ** 63):
                raise BadInput(f"{name}:{lineno}: 'seed' must be an integer in 0..2^63-1")
            neg = obj.get("negative_prompt")
            if neg is not None and not isinstance(neg, str):
                raise BadInput(f"{name}:{lineno}: 'negative_prompt' must be a string")
            items.append(PromptItem(prompt, neg, seed))
    else:
        items = [PromptItem(ln.strip()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not items:
        raise BadInput(f"{name}: no prompts in it")
    return items
