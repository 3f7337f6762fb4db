"""Images fetched from web addresses for the API (`run_app.py --allow-remote-images`), guarded against SSRF.

A client may send `image_url` with an http(s) address; fetching it makes this server a client of whatever the
address names, so a request could otherwise read the machine's own services, the local network or a cloud
metadata endpoint. Hence, for every hop: only http and https; the host is resolved here and every address it
resolves to must be public (`allow`) before anything connects; the connection goes to the address that was
checked (the name is not resolved again, so DNS cannot answer differently in between); redirects are followed
here, at most MAX_REDIRECTS, each with the same checks. The body is read in pieces and refused as soon as it
passes the size limit, and the whole fetch has a deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from .chat_service import MAX_IMAGE_BYTES

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TIMEOUT_S = 10.0  # the whole fetch, redirects included
MAX_REDIRECTS = 3
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class RemoteImageError(ValueError):
    """Why an address was not fetched, worded for the client; `refused` when the address itself is not
    allowed (as opposed to a fetch that failed)."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


def is_public(ip: IPAddress) -> bool:
    """A globally routable unicast address. IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4,
    NAT64) are judged by that address too: ::ffff:127.0.0.1 is loopback."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (ip in _NAT64 or ip in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
    return ip.is_global and not ip.is_multicast


def fetch_image(url: str, *, allow: Callable[[IPAddress], bool] = is_public, max_bytes: int = MAX_IMAGE_BYTES,
                timeout: float = TIMEOUT_S, max_redirects: int = MAX_REDIRECTS) -> bytes:
    """The body at `url` (any content: the caller decodes it as an image); RemoteImageError says why not."""
    deadline = time.monotonic() + timeout
    # No proxies from the environment: a proxy would connect wherever it likes, past the address checks.
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        for _ in range(max_redirects + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteImageError(f"fetching {url} took longer than {timeout:g} s.")
            request_url, headers, extensions = _pinned(url, allow)
            try:
                with client.stream("GET", request_url, headers=headers, extensions=extensions,
                                   timeout=remaining) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise RemoteImageError(f"{url} answered HTTP {response.status_code}.")
                    return _read(response, url, max_bytes, deadline, timeout)
            except httpx.TimeoutException:
                raise RemoteImageError(f"fetching {url} took longer than {timeout:g} s.") from None
            except httpx.HTTPError as e:
                raise RemoteImageError(f"{url} could not be fetched: {e or type(e).__name__}.") from None
    raise RemoteImageError(f"{url} redirects more than {max_redirects} times.")


def _pinned(url: str, allow: Callable[[IPAddress], bool]) -> tuple[str, dict, dict]:
    """(the URL with the host replaced by its checked address, the headers and request extensions that keep
    the name for the server: Host, and for https the TLS name that is sent and verified)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RemoteImageError(f"{url[:100]} is not an http or https address.", refused=True)
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise RemoteImageError(f"{url[:100]} has an invalid port.", refused=True) from None
    if not host:
        raise RemoteImageError(f"{url[:100]} has no host name.", refused=True)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise RemoteImageError(f"the host {host} was not found ({e}).") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    private = [a for a in addresses if not allow(a)]
    if private or not addresses:
        where = ", ".join(map(str, private or addresses))
        where = host if where == host else f"{host} (at {where})"
        raise RemoteImageError(f"{where} is a private, loopback, link-local or reserved address: this server "
                               "fetches only from public addresses.", refused=True)
    address = addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    # Userinfo is left out: credentials are not sent to an address given by a client.
    pinned = urlunsplit((scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    default_port = port == (443 if scheme == "https" else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return pinned, {"Host": host_header}, extensions


def _read(response: httpx.Response, url: str, max_bytes: int, deadline: float, timeout: float) -> bytes:
    too_big = RemoteImageError(f"the image at {url} is larger than {max_bytes // 2**20} MB."
                               if max_bytes >= 2**20 else f"the image at {url} is larger than {max_bytes:,} bytes.")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_big
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:  # stop here: the rest is never read
            raise too_big
        if time.monotonic() > deadline:
            raise RemoteImageError(f"fetching {url} took longer than {timeout:g} s.")
        chunks.append(chunk)
    if not size:
        raise RemoteImageError(f"{url} answered with an empty body.")
    return b"".join(chunks)
