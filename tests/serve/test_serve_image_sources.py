"""``image_url`` parts by file (under ``--media-root``) and by http(s) URL (``--allow-image-urls``),
through the official ``openai`` client against a server on the tiny composed (omni) model: a file or
a URL answers exactly as the data URI of the same image; escapes from the root, URLs on loopback
without ``--allow-private-image-urls``, and too large / slow / missing / non-image answers are 400s
naming the part. The URLs are served by a loopback ``http.server``."""

from __future__ import annotations

import base64
import http.server
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest

from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from nexus_core.serve.media import MediaError, checked_address
from tests.serve.helpers import one_torch_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "data" / "raw" / "omni" / "images"
CAP = 4000  # bytes an image may have on the test servers
RED = (IMAGES / "red_square.png").read_bytes()


class _Images(http.server.BaseHTTPRequestHandler):
    """Answers: /red.png, /redirect (→ /red.png), /loop (→ itself), /page (text/html), /big.png (over CAP,
    with Content-Length), /stream.png (over CAP, no Content-Length), /slow.png (3 s), anything else 404."""

    protocol_version = "HTTP/1.0"  # a body without Content-Length ends with the connection

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path in ("/redirect", "/loop"):
            self.send_response(302)
            self.send_header("Location", "/red.png" if self.path == "/redirect" else "/loop")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(3)
        body, ctype = {"/red.png": (RED, "image/png"), "/slow.png": (RED, "image/png"),
                       "/page": (b"<html>not an image</html>", "text/html"),
                       "/big.png": (RED + bytes(2 * CAP), "image/png"),
                       "/stream.png": (RED + bytes(2 * CAP), "image/png")}.get(self.path, (b"", ""))
        if not ctype:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if self.path != "/stream.png":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading at its cap

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def omni(tmp_path_factory: pytest.TempPathFactory, tiny_llm: Path) -> str:
    """The suite's tiny Llama (session-wide, read only) composed with a tiny vision tower."""
    from nexus_core.train.encoders import TinyVisionConfig, build_tiny_vision
    from nexus_core.train.omni import OmniConfig, compose

    root = tmp_path_factory.mktemp("omni-sources")
    vision = build_tiny_vision(root / "vision", TinyVisionConfig())
    compose(OmniConfig(vision="tiny"), tiny_llm, vision, root / "omni")
    return str(root / "omni")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/ holds red.png, sub/blue.png and a symlink to outside/secret.png; outside/ is beside it."""
    base = tmp_path_factory.mktemp("media")
    (base / "root" / "sub").mkdir(parents=True)
    (base / "outside").mkdir()
    shutil.copy(IMAGES / "red_square.png", base / "root" / "red.png")
    shutil.copy(IMAGES / "blue_circle.png", base / "root" / "sub" / "blue.png")
    shutil.copy(IMAGES / "red_square.png", base / "outside" / "secret.png")
    (base / "root" / "link.png").symlink_to(base / "outside" / "secret.png")
    (base / "root" / "big.png").write_bytes(RED + bytes(2 * CAP))
    return base


@pytest.fixture(scope="module")
def images_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _client(app) -> tuple[openai.OpenAI, object]:
    ctx = serve_in_thread(app)
    return openai.OpenAI(base_url=ctx.__enter__(), api_key="none", max_retries=0, timeout=30), ctx


@pytest.fixture(scope="module")
def open_client(omni: str, media: Path):
    """Files under media/root, URLs, private addresses too (the loopback image server needs that)."""
    app = create_app({"omni": omni}, media_root=str(media / "root"), allow_image_urls=True,
                     allow_private_image_urls=True, max_image_bytes=CAP, image_url_timeout_s=1.0)
    client, ctx = _client(app)
    yield client
    ctx.__exit__(None, None, None)  # pyright: ignore[reportAttributeAccessIssue]
    app.state.close()


@pytest.fixture(scope="module")
def public_client(omni: str):
    """URLs on public addresses only; no media root."""
    app = create_app({"omni": omni}, allow_image_urls=True)
    client, ctx = _client(app)
    yield client
    ctx.__exit__(None, None, None)  # pyright: ignore[reportAttributeAccessIssue]
    app.state.close()


def _ask(client: openai.OpenAI, url: str) -> tuple[str, float]:
    out = client.chat.completions.create(model="omni", max_tokens=6, temperature=0, logprobs=True, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What colour is the shape?"}]}])
    choice = out.choices[0]
    assert choice.logprobs and choice.logprobs.content
    return choice.message.content or "", choice.logprobs.content[0].logprob


def _refused(client: openai.OpenAI, url: str) -> str:
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, url)
    message = str(err.value)
    assert "messages[0].content[0]" in message
    return message


def test_a_file_under_the_media_root_answers_as_its_data_uri(open_client: openai.OpenAI, media: Path) -> None:
    for name, file in [("red_square.png", "red.png"), ("blue_circle.png", "sub/blue.png")]:
        expected = _ask(open_client, "data:image/png;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode())
        path = media / "root" / file
        for url in (path.as_uri(), str(path), f"file://localhost{path}"):
            text, logprob = _ask(open_client, url)
            assert text == expected[0] and logprob == pytest.approx(expected[1], abs=1e-5), url
    red, blue = _ask(open_client, str(media / "root" / "red.png")), _ask(open_client, str(media / "root/sub/blue.png"))
    assert red[1] != pytest.approx(blue[1], abs=1e-6)  # the file's image made the difference


def test_files_outside_the_root_or_without_one_are_refused(open_client, public_client, media: Path) -> None:
    root = media / "root"
    for url in (f"{root}/../outside/secret.png", (root / "link.png").as_uri(), str(root / "link.png"),
                str(media / "outside" / "secret.png"), "file:///etc/passwd", f"{root}/../outside/nothing.png"):
        assert "is outside the media root" in _refused(open_client, url), url
    assert "no readable file under the media root" in _refused(open_client, str(root / "nothing.png"))
    assert "is not a file" in _refused(open_client, str(root / "sub"))
    assert f"images may be at most {CAP}" in _refused(open_client, str(root / "big.png"))
    assert "names a host" in _refused(open_client, f"file://otherhost{root}/red.png")
    assert "must be a data:image/...;base64 URI, a file:// URL" in _refused(open_client, "red.png")
    message = _refused(public_client, (root / "red.png").as_uri())
    assert "file image_url parts are off" in message and "--media-root DIR" in message


def test_an_http_url_answers_as_its_data_uri_only_with_both_flags(open_client, public_client, images_url) -> None:
    expected = _ask(open_client, "data:image/png;base64," + base64.b64encode(RED).decode())
    for path in ("/red.png", "/redirect"):
        text, logprob = _ask(open_client, images_url + path)
        assert text == expected[0] and logprob == pytest.approx(expected[1], abs=1e-5)
    message = _refused(public_client, images_url + "/red.png")  # URLs on, but 127.0.0.1 is loopback
    assert "loopback/private/reserved address" in message and "--allow-private-image-urls" in message


@pytest.mark.parametrize(("path", "match"), [
    ("/missing.png", "answered HTTP 404"),
    ("/page", "is text/html, not an image"),
    ("/big.png", f"bytes; images may be at most {CAP}"),
    ("/stream.png", f"is over {CAP} bytes"),
    ("/slow.png", "timed out after 1 s"),
    ("/loop", "more than 3 redirects"),
])
def test_bad_image_urls_are_a_400_naming_the_part(open_client, images_url: str, path: str, match: str) -> None:
    started = time.monotonic()
    assert match in _refused(open_client, images_url + path)
    assert time.monotonic() - started < 2.5  # the slow one is cut at the timeout, not waited for


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254",
                                  "100.64.0.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "fd00::1", "224.0.0.1"])
def test_private_and_special_addresses_are_refused_unless_allowed(host: str) -> None:
    with pytest.raises(MediaError, match="loopback/private/reserved address"):
        checked_address(host, 80, allow_private=False)
    assert checked_address(host, 80, allow_private=True)


def test_public_addresses_pass_the_check() -> None:
    assert checked_address("8.8.8.8", 443, allow_private=False) == "8.8.8.8"
    assert checked_address("2001:4860:4860::8888", 443, allow_private=False) == "2001:4860:4860::8888"


def test_cli_threads_the_media_settings_and_vllm_refuses_them(omni: str) -> None:
    from flows.cli import build_parser
    from nexus_core.errors import InputError, NexusError
    from nexus_core.serve.launch import ServeConfig, serve_models

    args = build_parser().parse_args(["serve", f"omni={omni}", "--media-root", "/nowhere/media", "--allow-image-urls",
                                      "--allow-private-image-urls", "--max-image-mb", "2", "--image-url-timeout", "3"])
    assert (args.allow_image_urls, args.allow_private_image_urls, args.max_image_mb, args.image_url_timeout) == (
        True, True, 2.0, 3.0)
    with pytest.raises(InputError, match="media_root /nowhere/media: not a directory"):
        args.func(args)  # reaches create_app, which checks the root before loading any model
    with pytest.raises(NexusError, match="embedded engine only"):
        serve_models(ServeConfig(models={"a": "/nowhere"}, engine="vllm", allow_image_urls=True))
