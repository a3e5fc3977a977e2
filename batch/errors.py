"""Every error batch raises, in one tree.

::

    BatchError
     ├─ JobError            invalid job file (exit 2); names the key, suggests the closest
     ├─ InputError          names file + line/column; exit 2 before anything is sent
     ├─ OutputError         cannot write; fingerprint mismatch without --force
     ├─ Interrupted         a signal before anything was sent (exit 3)
     └─ ProviderError       one attempt failed; .model .status .retry_after .detail
         ├─ TransientError    retry this model: timeout, connection, 408/409/5xx, bad body
         │   └─ RateLimited   429: pause the whole model, honour retry-after
         ├─ FallbackError     next model can answer: context length, not found, filtered
         ├─ RejectedError     400: final for this model
         └─ FatalError        401/402/403, insufficient quota: stop the run now

The *class* of a ProviderError decides what the router does; its ``kind``
becomes the row's ``error_type`` and the key of the error counts in stats.
No attribute or message of any error ever holds an API key or auth header:
``detail`` is a truncated excerpt of the response body.
"""

from __future__ import annotations

import re

DETAIL_CHARS = 300
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_MASKED = re.compile(r"[\w.-]*\*{4,}[\w.-]*")  # OpenAI echoes keys as sk-abc*****wxyz
_TOKEN = re.compile(r"[\w.-]{12,}")


def redact(text: str, secret: str | None) -> str:
    """``text`` without the API key: the key itself, long pieces of it, masked echoes, bearer tokens.

    Providers and proxies repeat keys in error messages (some the whole key,
    OpenAI a masked one); nothing batch writes or prints may carry them.
    """
    if secret:
        text = text.replace(secret, "[redacted]")
        for token in set(_TOKEN.findall(text)):
            if token in secret:
                text = text.replace(token, "[redacted]")
    text = _BEARER.sub("Bearer [redacted]", text)
    return _MASKED.sub("[redacted]", text)


class BatchError(Exception):
    """Base of every error batch raises on purpose."""


class JobError(BatchError, ValueError):
    """The job file is invalid; the message names the file and the key."""


class InputError(BatchError, ValueError):
    """The input cannot be read; the message names the file and line or row."""


class Interrupted(BatchError):
    """A signal stopped the run before anything was sent (exit 3: rerun to start)."""


class OutputError(BatchError, OSError):
    """The output directory cannot be written, or holds answers to another job."""


class ProviderError(BatchError):
    """One attempt at one model failed.

    Attributes:
        kind: the fixed-vocabulary error type written to result rows and stats.
        model: the model the attempt went to.
        status: the HTTP status, or None when no response arrived.
        retry_after: seconds the provider asked us to wait, when it said.
        detail: a short excerpt of what the provider said.
    """

    kind = "provider_error"

    def __init__(
        self,
        detail: str,
        *,
        model: str = "",
        status: int | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        self.detail = detail[:DETAIL_CHARS]
        self.model = model
        self.status = status
        self.retry_after = retry_after
        self.charged_usd: float | None = None  # a failed attempt the provider still billed
        self.charged_tokens: tuple[int, int] = (0, 0)  # its billed (prompt, completion) tokens
        if kind is not None:
            self.kind = kind
        super().__init__(self.detail)

    def redact(self, secret: str | None) -> None:
        """Remove the API key from what the provider said (called where replies are parsed)."""
        self.detail = redact(self.detail, secret)
        self.args = (self.detail,)

    def __str__(self) -> str:
        where = f"{self.model}: " if self.model else ""
        status = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{status}{self.kind}: {self.detail}"


class TransientError(ProviderError):
    """Retry the same model after a backoff."""

    kind = "server_error"


class RateLimited(TransientError):
    """The model is at its rate limit: pause the whole model, then retry.

    ``scope`` is "requests", "tokens" or None (unknown); ``limit_requests`` and
    ``limit_tokens`` are per-minute limits the provider stated, if any.
    """

    kind = "rate_limited"
    scope: str | None = None
    limit_requests: float | None = None
    limit_tokens: float | None = None
    evidence: bool = False  # it says our rate reached a limit (headers, a stated limit), not a scattered refusal
    capacity: bool = False  # OpenRouter's capacity_exhausted: the model's providers are full


class FallbackError(ProviderError):
    """This model cannot answer this row, but another model may."""

    kind = "model_unavailable"


class RejectedError(ProviderError):
    """The request is invalid for this model; retrying cannot help."""

    kind = "bad_request"


class FatalError(ProviderError):
    """The account or key is unusable: stop the whole run at once."""

    kind = "auth"
