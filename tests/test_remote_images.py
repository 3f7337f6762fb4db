"""app.remote_images against a real local HTTP server. The server is on 127.0.0.1, which the default policy
refuses (that refusal is tested too); to fetch from it, the tests pass an `allow` that lets 127.0.0.1 stand for a
public host and nothing else."""

from __future__ import annotations

import io
import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from app.remote_images import RemoteImageError, fetch_image, is_public

LOOPBACK = ipaddress.ip_address("127.0.0.1")
STREAMED_BYTES = 64 * 2**20  # what /endless would send if the client read it all
CHUNK = 2**16


def only_the_test_server(ip) -> bool:
    return ip == LOOPBACK


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), "teal").save(buffer, format="PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    image = png_bytes()

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path == "/image.png":
            self._send(200, self.image, {"Content-Type": "image/png"})
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/image.png"})
        elif self.path == "/to-metadata":  # the classic SSRF target: a cloud metadata service
            self._send(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif self.path == "/endless":
            self._endless()
        else:
            self._send(404, b"not here", {})

    def _send(self, status, body, headers):
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _endless(self):
        """A body without Content-Length (HTTP/1.0: it ends when the connection closes); records how much
        went out before the client hung up."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        sent = 0
        try:
            while sent < STREAMED_BYTES:
                self.wfile.write(bytes(CHUNK))
                sent += CHUNK
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.streamed.append(sent)
            self.server.stream_done.set()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.streamed, httpd.stream_done = [], [], threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetches_an_image_from_an_allowed_address(server):
    httpd, base = server
    assert fetch_image(f"{base}/image.png", allow=only_the_test_server) == Handler.image
    assert fetch_image(f"{base}/redirect", allow=only_the_test_server) == Handler.image  # a redirect is followed
    assert httpd.requests == ["/image.png", "/redirect", "/image.png"]


def test_loopback_is_refused_before_connecting(server):
    httpd, base = server
    for url in (f"{base}/image.png", f"http://localhost:{httpd.server_address[1]}/image.png"):
        with pytest.raises(RemoteImageError, match="private, loopback") as info:
            fetch_image(url)
        assert info.value.refused
    assert httpd.requests == []  # nothing reached the server


def test_a_redirect_to_a_private_address_is_refused(server):
    httpd, base = server
    with pytest.raises(RemoteImageError, match="169.254.169.254") as info:
        fetch_image(f"{base}/to-metadata", allow=only_the_test_server)
    assert info.value.refused
    assert httpd.requests == ["/to-metadata"]


def test_redirects_are_limited(server):
    httpd, base = server
    with pytest.raises(RemoteImageError, match="redirects more than 3 times"):
        fetch_image(f"{base}/loop", allow=only_the_test_server, max_redirects=3)
    assert httpd.requests == ["/loop"] * 4


def test_a_body_over_the_limit_is_refused(server):
    httpd, base = server
    # Announced by Content-Length: refused before reading the body.
    with pytest.raises(RemoteImageError, match=f"larger than {len(Handler.image) - 1:,} bytes"):
        fetch_image(f"{base}/image.png", allow=only_the_test_server, max_bytes=len(Handler.image) - 1)
    # Not announced: refused while reading, so the server could not send it all.
    with pytest.raises(RemoteImageError, match="larger than 100,000 bytes"):
        fetch_image(f"{base}/endless", allow=only_the_test_server, max_bytes=100_000)
    assert httpd.stream_done.wait(30)
    assert httpd.streamed[0] < STREAMED_BYTES


def test_errors_say_what_went_wrong(server):
    _, base = server
    with pytest.raises(RemoteImageError, match="answered HTTP 404") as info:
        fetch_image(f"{base}/nothing", allow=only_the_test_server)
    assert not info.value.refused
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/a.png", "gopher://127.0.0.1/"):
        with pytest.raises(RemoteImageError, match="not an http or https address") as info:
            fetch_image(url, allow=only_the_test_server)
        assert info.value.refused
    with pytest.raises(RemoteImageError, match="was not found"):
        fetch_image("http://no-such-host.invalid/a.png", allow=only_the_test_server)


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.10", False), ("172.16.0.1", False),
    ("100.64.0.1", False), ("169.254.169.254", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("239.1.1.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("::127.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::a00:1", False),
])
def test_which_addresses_are_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public
