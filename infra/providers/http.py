"""A small JSON-over-HTTPS helper shared by the provider clients (bearer auth, retries, no secret leaks)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from infra.providers.base import ProviderError, scrub

#: Statuses worth one more try: rate limited or a gateway hiccup. Capacity errors are not retried
#: here; the worker moves on to the next GPU type or region instead.
RETRY_STATUSES = {429, 502, 503, 504}


class JsonAPI:
    """Bearer-authenticated JSON client; the key lives only in the httpx client's headers."""

    def __init__(self, base_url: str, api_key: str, provider: str, *, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 1.0):
        self.provider = provider
        self._key = api_key
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=timeout_s,
                                       headers={"Authorization": f"Bearer {api_key}",
                                                "Accept": "application/json"})

    def __repr__(self) -> str:  # never show the key
        return f"JsonAPI({self.provider}, {self._http.base_url})"

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None) -> httpx.Response:
        """Send a request, retrying rate limits and gateway errors (honouring Retry-After)."""
        for attempt in range(self._retries + 1):
            try:
                resp = await self._http.request(method, path.lstrip("/"), json=json, params=params)
            except httpx.TransportError as exc:
                if attempt == self._retries:
                    raise ProviderError(f"{self.provider}: {method} {path} failed: "
                                        f"{scrub(str(exc), self._key)}") from None
                await asyncio.sleep(self._backoff_s * 2 ** attempt)
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self._retries:
                wait = resp.headers.get("Retry-After")
                await asyncio.sleep(float(wait) if wait and wait.replace(".", "").isdigit()
                                    else self._backoff_s * 2 ** attempt)
                continue
            return resp
        raise AssertionError("unreachable")

    def error_text(self, resp: httpx.Response) -> str:
        """The response body as text with the API key scrubbed (some APIs echo requests)."""
        return scrub(resp.text[:500], self._key)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
