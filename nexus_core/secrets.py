"""No secrets at rest: what counts as a secret name, and :func:`scrub` for provider text.

Keys live in environment variables only; configs name the variable (``api_key_env``). Anything a
provider sends back (error bodies that echo the ``Authorization`` header, exception messages) goes
through :func:`scrub` before it is stored in a table, logged or raised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

SECRET_NAMES = (
    "api_key", "apikey", "api_token", "token", "auth_token", "access_token", "refresh_token", "hf_token",
    "secret", "client_secret", "secret_key", "secret_access_key", "private_key", "password", "passwd",
    "authorization", "credential", "credentials",
)
"""Names (and ``_``-suffixes) of config keys and environment variables that hold a secret."""

# compound spellings without a separator (openaiApiKey -> openaiapikey)
_GLUED = ("apikey", "apitoken", "authtoken", "accesstoken", "secretkey", "privatekey", "password", "passwd",
          "secret")
_ENV_SUFFIXES = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD")
_MIN_SECRET_LEN = 8  # shorter env values ("1", "true") would blank out ordinary text
REDACTED = "***"

_BEARER = re.compile(r"(?i)\b(bearer)(\s+)(?!\*\*\*)[A-Za-z0-9._~+/=:-]{4,}")
_HEADER = re.compile(
    r"(?i)((?<![A-Za-z0-9])(?:authorization|proxy-authorization|x-api-key|api[-_]?key|x-goog-api-key|"
    r"access[-_]token|auth[-_]token|password|passwd|secret)[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
    r"(?!\*\*\*|(?:bearer|basic|token)\s)([^\s\"',;}&]+)")
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{8,}|sk_(?:live|test)_[A-Za-z0-9]{8,}|hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,})")


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def is_secret_name(name: str) -> bool:
    """Whether a config key or variable name looks like it holds a secret (case-insensitive, ``-`` and
    ``_`` alike): one of :data:`SECRET_NAMES` whole or as a ``_``-suffix, or a glued spelling
    (``openaiApiKey``). ``api_key_env`` (a variable *name*) and ``max_tokens`` are not."""
    n = _norm(name)
    return any(n == s or n.endswith("_" + s) for s in SECRET_NAMES) or n.endswith(_GLUED)


def is_secret_env(name: str) -> bool:
    """Whether environment variable ``name`` holds a secret: a secret name, or ending in
    KEY/TOKEN/SECRET/PASSWORD/PASSWD."""
    return is_secret_name(name) or name.upper().endswith(_ENV_SUFFIXES)


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """Values of every secret-looking environment variable that is set (plus ``extra``), longest first."""
    values = {v for k, v in os.environ.items() if is_secret_env(k)}
    values.update(v for v in extra if v)
    return sorted((v for v in values if len(v.strip()) >= _MIN_SECRET_LEN), key=len, reverse=True)


def scrub(text: str | None, extra: Iterable[str | None] = ()) -> str | None:
    """``text`` with secrets replaced by ``***``: the value of every secret-looking environment variable
    that is set, each of ``extra`` (e.g. the configured ``api_key_env``'s value), bearer / Authorization /
    api-key header values, and well-known key shapes (``sk-...``, ``hf_...``, ``AKIA...``)."""
    if not text:
        return text
    for value in secret_values(extra):
        if value in text:
            text = text.replace(value, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    return _KEY_SHAPES.sub(REDACTED, text)


def redact_value(value: str) -> str:
    """``value`` with any secret environment variable's value in it replaced (``***`` when equal)."""
    for secret in secret_values():
        if secret in value:
            value = value.replace(secret, REDACTED)
    return value
