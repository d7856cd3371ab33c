"""Where the image of a served ``image_url`` part comes from, safely.

- ``data:image/...;base64,`` URIs: always.
- ``file://`` URLs and plain absolute paths: only under the server's media root (``media_root`` /
  ``--media-root``). Symlinks and ``..`` are resolved first and anything that then lies outside the
  root is refused, without saying whether it exists.
- ``http(s)://`` URLs: only when enabled (``allow_image_urls``). Every hop (at most ``max_redirects``
  redirects, each one checked again) resolves its host and refuses loopback, private, link-local
  (cloud metadata), reserved and multicast addresses unless ``allow_private`` is set; the connection
  then goes to the address that was checked (the Host header and TLS name stay the URL's), so a DNS
  answer that changes between check and connect cannot point it elsewhere. Proxy environment
  variables are not used. The answer must be 200 with an ``image/*`` content type and at most
  ``max_bytes`` bytes (``Content-Length`` first, then counted while reading), all within ``timeout_s``.

Every image decodes through :func:`nexus_core.io.images.open_upright` (EXIF orientation applied).
Failures raise :class:`MediaError` with a message the server prefixes with the part's position.
Fetching and reading block: the server calls this from worker threads, never on the event loop.
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nexus_core.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

FILE_OFF = ("file image_url parts are off on this server: start it with --media-root DIR (media_root in the serve "
            "config) to serve images from under DIR")
URLS_OFF = ("http(s) image_url parts are off on this server: start it with --allow-image-urls (allow_image_urls: "
            "true in the serve config) to let it fetch them")


class MediaError(ValueError):
    """An ``image_url`` part that cannot be used; the message says why (and how to enable what is off)."""


@dataclass(frozen=True)
class ImageSources:
    """What a server may read images from (see the module docstring); the default takes data URIs only."""

    media_root: Path | None = None
    allow_urls: bool = False
    allow_private: bool = False
    max_bytes: int = 8 * 2**20
    timeout_s: float = 10.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.media_root is not None:
            root = Path(os.path.realpath(self.media_root))
            if not root.is_dir():
                raise InputError(f"media_root {self.media_root}: not a directory")
            object.__setattr__(self, "media_root", root)


def load_image(value: Any, sources: ImageSources) -> Image.Image:
    """The upright RGB image of an ``image_url`` part's value (``{"url": ...}`` or the URL itself)."""
    from PIL import UnidentifiedImageError

    from nexus_core.io.images import open_upright

    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise MediaError("image_url needs a url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        raw = _data_uri(url)
    elif scheme in ("http", "https"):
        raw = _fetch(url, sources)
    elif scheme == "file" or url.startswith("/"):
        raw = _read_file(url, sources)
    else:
        raise MediaError("image_url must be a data:image/...;base64 URI, a file:// URL or absolute path under the "
                         "media root, or an http(s) URL")
    try:
        return open_upright(io.BytesIO(raw))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MediaError(f"the image cannot be decoded ({type(exc).__name__})") from exc


def _data_uri(url: str) -> bytes:
    import base64
    import binascii

    if not url.startswith("data:image/") or ";base64," not in url:
        raise MediaError("a data URI image_url must be data:image/...;base64,...")
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the image cannot be decoded ({type(exc).__name__})") from exc


def _read_file(url: str, sources: ImageSources) -> bytes:
    from urllib.parse import unquote, urlsplit

    if sources.media_root is None:
        raise MediaError(FILE_OFF)
    if url.startswith("/"):
        path = url
    else:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file URL {url!r} names a host; only this machine's files (file:///...) are read")
        path = unquote(parts.path)
    try:
        real = Path(os.path.realpath(path))  # symlinks and .. resolved before the check
    except ValueError as exc:  # a NUL byte
        raise MediaError(f"{url!r} is not a usable path") from exc
    if not os.path.isabs(path) or not real.is_relative_to(sources.media_root):
        raise MediaError(f"{url!r} is outside the media root; only files under it are served")
    try:
        # O_NOFOLLOW: a last component swapped for a symlink after the check is not followed
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise MediaError(f"{url!r}: no readable file under the media root") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MediaError(f"{url!r} is not a file")
        if st.st_size > sources.max_bytes:
            raise MediaError(f"{url!r} is {st.st_size} bytes; images may be at most {sources.max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(sources.max_bytes + 1)
    finally:
        os.close(fd)


def checked_address(host: str, port: int, allow_private: bool) -> str:
    """An address ``host`` resolves to; every one it resolves to must be public unless ``allow_private``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MediaError(f"host {host!r} does not resolve") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for a in addresses:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_global or ip.is_multicast:
                raise MediaError(f"host {host!r} is at {a}, a loopback/private/reserved address; such image URLs "
                                 "are refused unless --allow-private-image-urls (allow_private_image_urls: true)")
    return addresses[0]


def _fetch(url: str, sources: ImageSources) -> bytes:
    import httpx

    if not sources.allow_urls:
        raise MediaError(URLS_OFF)
    deadline = time.monotonic() + sources.timeout_s
    with httpx.Client(timeout=sources.timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(sources.max_redirects + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise MediaError(f"{url!r} is not a valid URL") from exc
            if target.scheme not in ("http", "https") or not target.host:
                raise MediaError(f"{url!r}: only http(s) URLs with a host are fetched")
            port = target.port or (443 if target.scheme == "https" else 80)
            address = checked_address(target.host, port, sources.allow_private)
            host_header = target.netloc.decode("ascii")
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            try:
                with client.stream("GET", target.copy_with(host=address), headers={"Host": host_header},
                                   extensions=extensions) as resp:
                    if resp.is_redirect:
                        url = str(target.join(resp.headers["location"]))
                        continue
                    return _read_image_body(url, resp, sources, deadline)
            except httpx.TimeoutException as exc:
                raise MediaError(f"fetching {url!r} timed out after {sources.timeout_s:g} s") from exc
            except httpx.HTTPError as exc:
                raise MediaError(f"{url!r} could not be fetched ({type(exc).__name__})") from exc
    raise MediaError(f"{url!r}: more than {sources.max_redirects} redirects")


def _read_image_body(url: str, resp: Any, sources: ImageSources, deadline: float) -> bytes:
    if resp.status_code != 200:
        raise MediaError(f"fetching {url!r} answered HTTP {resp.status_code}")
    ctype = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not ctype.startswith("image/"):
        raise MediaError(f"{url!r} is {ctype or 'of no content type'}, not an image")
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > sources.max_bytes:
        raise MediaError(f"{url!r} is {length} bytes; images may be at most {sources.max_bytes}")
    body = bytearray()
    for chunk in resp.iter_bytes():
        body += chunk
        if len(body) > sources.max_bytes:
            raise MediaError(f"{url!r} is over {sources.max_bytes} bytes; images may be at most that")
        if time.monotonic() > deadline:
            raise MediaError(f"fetching {url!r} timed out after {sources.timeout_s:g} s")
    return bytes(body)
