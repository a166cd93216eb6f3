"""Text as a model writes it: `gateloop generate` prints each piece as soon as it is certain.

A piece is held back while it could still change: a trailing U+FFFD (a character whose bytes have
not all been generated yet) and, with stop strings, the last len(stop) - 1 characters (they may be
the start of one). The pieces joined are decode(prompt + continuation), cut before the first stop
string in the continuation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .models import LanguageModel

REPLACEMENT = "\ufffd"


def stream_text(model: LanguageModel, tokenizer, ids: list[int], max_new_tokens: int, *,
                stop: Sequence[str] = (), device="cpu", **sampling) -> Iterator[str]:
    """Yields the prompt's text, then the continuation piece by piece; sampling: model.stream's options."""
    stop = [s for s in stop if s]
    hold = max((len(s) for s in stop), default=1) - 1
    yield tokenizer.decode(ids)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    new: list[int] = []
    printed = 0
    text = ""
    for token, _ in model.stream(prompt, max_new_tokens, **sampling):
        new.append(int(token[0, 0]))
        text = tokenizer.decode(new)  # the prompt is whole characters, so its continuation decodes alone
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            yield text[printed:cut]
            return
        safe = len(text.rstrip(REPLACEMENT)) - hold
        if safe > printed:
            yield text[printed:safe]
            printed = safe
    yield text[printed:]
