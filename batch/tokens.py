"""Prompt token counting: exact with tiktoken when its encoding is already on
disk, else a documented heuristic. Never a network download at run time.

Heuristic: ceil(characters / 4) per prompt, plus OpenAI's chat framing of 4
tokens per message and 3 to prime the reply. On the demo reviews it counts
12% more than the cl100k_base encoding: on the safe side for budgets, and
the token budget is reconciled with the provider's reported usage anyway.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4
TOKENS_REPLY_PRIMER = 3
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _text(content: Any) -> str:
    return content if isinstance(content, str) else orjson.dumps(content).decode()


def heuristic_tokens(messages: list[dict[str, Any]]) -> int:
    chars = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif content is not None:
            chars += len(orjson.dumps(content))
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + TOKENS_REPLY_PRIMER


@dataclass(frozen=True, slots=True)
class TokenCounter:
    name: str
    exact: bool
    count: Callable[[list[dict[str, Any]]], int]


HEURISTIC = TokenCounter("heuristic: 4 characters per token + chat framing", False, heuristic_tokens)


def _tiktoken_cached() -> bool:
    """Is cl100k_base in tiktoken's cache? (tiktoken would download it otherwise.)"""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")
    return os.path.exists(os.path.join(cache, hashlib.sha1(_CL100K_URL.encode()).hexdigest()))


def load_counter() -> TokenCounter:
    """tiktoken's cl100k_base when installed and cached locally (``pip install batch[tokens]``), else the heuristic."""
    try:
        import tiktoken
    except ImportError:
        return HEURISTIC
    if not _tiktoken_cached():
        return HEURISTIC
    enc = tiktoken.get_encoding("cl100k_base")

    def count(messages: list[dict[str, Any]]) -> int:
        return sum(TOKENS_PER_MESSAGE + len(enc.encode(_text(m.get("content")), disallowed_special=()))
                   for m in messages) + TOKENS_REPLY_PRIMER

    return TokenCounter("tiktoken cl100k_base (exact for OpenAI models)", True, count)
