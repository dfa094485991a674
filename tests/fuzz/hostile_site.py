"""A hostile web site on loopback: pages built to hurt a crawler and an extractor.

    with HostileSite() as site:
        crawl(site.url("/"))

A ThreadingHTTPServer on 127.0.0.1 (ephemeral port), like tests/site.py, but every page is an attack.
``PAGES`` names each route and what it does; the index links to all of them (so they are depth 1 from
the index). Bodies are built once per process (the compression bombs take a fraction of a second: they
repeat one compressed block or frame instead of compressing gigabytes).

Every request is recorded (``site.hits(path)``), and for the streamed routes the server records how many
bytes it managed to send before the client hung up (``site.sent[path]``), which shows that a client
stopped reading.
"""

from __future__ import annotations

import functools
import random
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import zstandard

from tests.site import _paragraphs

HTML = "text/html; charset=utf-8"
GIB = 1 << 30
MIB = 1 << 20

# The text every "safe" hostile page carries, so a correct extractor finds something.
_PROSE = "\n".join(f"<p>{p}</p>" for p in _paragraphs("/hostile", "lighthouse keepers", 3))


def _doc(body: str | bytes, *, head: bytes = b'<meta charset="utf-8">', title: bytes = b"Hostile page") -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return (b"<!DOCTYPE html>\n<html lang=\"en\"><head>" + head + b"<title>" + title + b"</title></head><body>"
            + body + b"</body></html>\n")


# --- bodies -------------------------------------------------------------------------------------------


def deep_nesting(depth: int = 100_000) -> bytes:
    """`depth` nested <div>s around real text: libxml2, lxml and trafilatura all walk trees recursively."""
    return _doc(b"<div>" * depth + _PROSE.encode() + b"</div>" * depth)


def deep_unclosed(depth: int = 50_000) -> bytes:
    """Formatting elements that never close (<b><i><u>...): the HTML parser's reconstruction of active
    formatting elements is quadratic in naive implementations."""
    return _doc(b"<p>" + b"<b><i><u><font>" * (depth // 4) + _PROSE.encode())


def deep_tables(depth: int = 20_000) -> bytes:
    return _doc(b"<table><tr><td>" * depth + _PROSE.encode())


def huge_attribute(size: int = 10 * MIB) -> bytes:
    """One 10 MB attribute value on an element of an otherwise normal page."""
    return _doc(b'<div data-blob="' + b"A" * size + b'">' + _PROSE.encode() + b"</div>")


def many_attributes(n: int = 100_000) -> bytes:
    """One element with 100 000 distinct attributes: libxml2's duplicate-attribute check, htmldate and trafilatura
    are quadratic in them (40 000 attributes, 0.5 MB, take 2-15 s to extract on 2 cores; 100 000, 1.3 MB, about
    2.5 minutes), so this one is far past any sane time budget on any machine."""
    attrs = b" ".join(b"a%d=%d" % (i, i) for i in range(n))
    return _doc(b"<div " + attrs + b">" + _PROSE.encode() + b"</div>")


def latin1_declared_utf8() -> bytes:
    """Declares UTF-8 (header and meta) but is Latin-1: every accented letter is an invalid UTF-8 byte."""
    text = ("<p>Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade, \u00e9t\u00e9 \u00e0 la plage: the keepers wrote "
            "their logs in French and English, and the archivist copied every entry.</p>" + _PROSE)
    return _doc(text.encode("latin-1", errors="replace"))


def bogus_charset() -> bytes:
    """A charset no codec knows, in the meta tag (the header says another unknown one)."""
    return _doc(_PROSE, head=b'<meta charset="x-no-such-charset-42"><meta http-equiv="Content-Type" '
                              b'content="text/html; charset=utf-99">')


def bom_mismatch() -> bytes:
    """A UTF-16LE byte order mark in front of UTF-8 bytes that declare UTF-8."""
    return b"\xff\xfe" + _doc(_PROSE)


def utf16_declared_utf8() -> bytes:
    """The whole page in UTF-16LE without a BOM, declared UTF-8: NUL after every ASCII byte."""
    return _doc(_PROSE).decode().encode("utf-16-le")


def invalid_utf8() -> bytes:
    """Overlong forms, lone surrogates, truncated sequences and stray continuation bytes in every paragraph."""
    bad = [b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xff",
           b"\xf4\x90\x80\x80"]
    rng = random.Random("invalid-utf8")
    out = bytearray()
    for word in _PROSE.encode().split(b" "):
        out += word + b" "
        if rng.random() < 0.2:
            out += rng.choice(bad)
    return _doc(bytes(out))


def binary_garbage(size: int = 300_000) -> bytes:
    """Random bytes (fixed seed) served as text/html."""
    return random.Random("binary-garbage").randbytes(size)


def nul_flood(size: int = 1 * MIB) -> bytes:
    return b"\x00" * size


def many_links(n: int = 200_000) -> bytes:
    """200 000 links: the extractor keeps its outlink cap."""
    links = b"".join(b'<a href="/l/%d.html">link %d</a> ' % (i, i) for i in range(n))
    return _doc(_PROSE.encode() + b"<div>" + links + b"</div>")


def gzip_bomb(inflated: int = 4 * GIB) -> bytes:
    """A valid gzip stream of `inflated` zero bytes (about 4 MB): one full-flushed deflate block of 16 MiB of
    zeros, repeated, then an empty final block and the trailer (CRC-32 and size modulo 2**32)."""
    piece = 16 * MIB
    zeros = bytes(piece)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)   # byte-aligned, no back-references past it
    final = comp.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(inflated // piece):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + block * (inflated // piece) + final + struct.pack("<II", crc, inflated & 0xFFFFFFFF)


def deflate_bomb(inflated: int = GIB) -> bytes:
    """The same as a zlib stream (Content-Encoding: deflate)."""
    piece = 16 * MIB
    zeros = bytes(piece)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    final = comp.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(inflated // piece):
        adler = zlib.adler32(zeros, adler)
    return b"\x78\xda" + block * (inflated // piece) + final + struct.pack(">I", adler)


def zstd_bomb(inflated: int = 16 * GIB) -> bytes:
    """Concatenated zstd frames of zeros: 16 GiB from a few hundred kB. One 64 kB network read of it
    inflates to gigabytes in a decoder that does not bound its output."""
    piece = 64 * MIB
    frame = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(piece))
    return frame * (inflated // piece)


def gzip_of_gzip_bomb() -> bytes:
    """`Content-Encoding: gzip, gzip`: the gzip bomb, gzipped again (two layers to decode)."""
    return zlib.compress(gzip_bomb(GIB), 9, wbits=31)


def honest_page() -> bytes:
    """A normal page (the control: compressed honestly, it must come out byte for byte)."""
    return _doc("<h1>Honest page</h1>" + _PROSE, title=b"Honest page")


def gzip_honest() -> bytes:
    return zlib.compress(honest_page(), 6, wbits=31)


def deflate_raw_honest() -> bytes:
    """`Content-Encoding: deflate` as some servers send it: raw deflate, without the zlib header."""
    return zlib.compress(honest_page(), 6, wbits=-15)


def zstd_honest() -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(honest_page())


def gzip_zstd_honest() -> bytes:
    """`Content-Encoding: gzip, zstd`: gzipped first, then zstd (decoded in the opposite order)."""
    return zstandard.ZstdCompressor(level=3).compress(gzip_honest())


def corrupt_gzip() -> bytes:
    """Says gzip, is not."""
    return b"\x1f\x8b\x08\x00" + random.Random("corrupt-gzip").randbytes(5000)


@functools.cache
def body(path: str) -> bytes:
    return PAGES[path].make()


# --- routes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    what: str
    make: Callable[[], bytes] = lambda: b""
    content_type: str = HTML
    headers: tuple[tuple[str, str], ...] = ()
    mode: str = "static"        # static | endless | trickle | short | huge_header | silent
    crawled_ok: bool = True     # a correct crawler fetches it with HTTP 200 (then extracts or fails it)


PAGES: dict[str, Page] = {
    "/deep-divs.html": Page("100 000 nested <div> elements around real text", deep_nesting),
    "/deep-unclosed.html": Page("50 000 unclosed formatting elements", deep_unclosed),
    "/deep-tables.html": Page("20 000 nested tables", deep_tables),
    "/huge-attribute.html": Page("a 10 MB attribute value", huge_attribute),
    "/many-attributes.html": Page("one element with 100 000 attributes", many_attributes),
    "/many-links.html": Page("200 000 links", many_links),
    "/latin1.html": Page("declared UTF-8, is Latin-1", latin1_declared_utf8),
    "/bogus-charset.html": Page("unknown charsets in header and meta", bogus_charset,
                                content_type="text/html; charset=x-bogus-charset"),
    "/bom-mismatch.html": Page("UTF-16LE BOM on a UTF-8 page", bom_mismatch),
    "/utf16.html": Page("UTF-16LE without BOM, declared UTF-8", utf16_declared_utf8),
    "/invalid-utf8.html": Page("overlong forms, surrogates, truncated sequences", invalid_utf8),
    "/binary.html": Page("300 kB of random bytes as text/html", binary_garbage),
    "/nul.html": Page("1 MB of NUL bytes as text/html", nul_flood),
    "/empty-body.html": Page("200 with an empty body", lambda: b""),
    "/gzip-bomb.html": Page("gzip body of ~4 MB that inflates to 4 GiB", gzip_bomb,
                            headers=(("Content-Encoding", "gzip"),)),
    "/deflate-bomb.html": Page("deflate body of ~1 MB that inflates to 1 GiB", deflate_bomb,
                               headers=(("Content-Encoding", "deflate"),)),
    "/zstd-bomb.html": Page("zstd body of ~0.5 MB that inflates to 16 GiB", zstd_bomb,
                            headers=(("Content-Encoding", "zstd"),)),
    "/gzip-gzip-bomb.html": Page("two gzip layers around 1 GiB of zeros", gzip_of_gzip_bomb,
                                 headers=(("Content-Encoding", "gzip, gzip"),)),
    "/gzip-honest.html": Page("a normal page, gzip", gzip_honest, headers=(("Content-Encoding", "gzip"),)),
    "/deflate-raw-honest.html": Page("a normal page, raw deflate", deflate_raw_honest,
                                     headers=(("Content-Encoding", "deflate"),)),
    "/zstd-honest.html": Page("a normal page, zstd", zstd_honest, headers=(("Content-Encoding", "zstd"),)),
    "/gzip-zstd-honest.html": Page("a normal page, gzip then zstd", gzip_zstd_honest,
                                   headers=(("Content-Encoding", "gzip, zstd"),)),
    "/corrupt-gzip.html": Page("Content-Encoding gzip, body is not gzip", corrupt_gzip,
                               headers=(("Content-Encoding", "gzip"),), crawled_ok=False),
    "/unknown-encoding.html": Page("Content-Encoding br (not supported here): random bytes", binary_garbage,
                                   headers=(("Content-Encoding", "br"),)),
    "/endless.html": Page("a chunked body of valid HTML that never ends", mode="endless"),
    "/trickle.html": Page("one byte every 0.2 s, forever", mode="trickle", crawled_ok=False),
    "/short-body.html": Page("Content-Length 100000, 100 bytes, then the connection closes", mode="short",
                             crawled_ok=False),
    "/huge-header.html": Page("a 1 MB response header", mode="huge_header", crawled_ok=False),
    "/silent.html": Page("accepts the request and never answers", mode="silent", crawled_ok=False),
}


def _index() -> bytes:
    items = "\n".join(f'<li><a href="{path}">{p.what}</a></li>' for path, p in PAGES.items())
    return _doc(f"<h1>A hostile site</h1>{_PROSE}<ul>{items}</ul>", title=b"Hostile index")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    site: HostileSite

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the crawler hung up (size cap, timeout): expected here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HostileSite/1.0"
    timeout = 30
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.site._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.site._track(self.connection, False)

    def do_GET(self) -> None:
        self.server.site._serve(self)


class HostileSite:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self.sent: dict[str, int] = {}
        self._connections: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.site = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hostile-site-{self.port}", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}{path}"

    def hits(self, path: str) -> int:
        with self._lock:
            return self._requests.count(path)

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> HostileSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, conn: socket.socket, opened: bool) -> None:
        with self._lock:
            (self._connections.add if opened else self._connections.discard)(conn)

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + n

    def _serve(self, h: _Handler) -> None:
        path = urlsplit(h.path).path or "/"
        with self._lock:
            self._requests.append(path)
        if path == "/robots.txt":
            return self._send(h, 200, b"User-agent: *\nAllow: /\n", "text/plain")
        if path in ("/", "/index.html"):
            return self._send(h, 200, _index(), HTML)
        page = PAGES.get(path)
        if page is None:
            return self._send(h, 404, _doc("<p>Not here.</p>"), HTML)
        mode = page.mode
        if mode == "static":
            return self._send(h, 200, body(path), page.content_type, page.headers)
        if mode == "silent":
            self._closing.wait(60)
            h.close_connection = True
            return None
        if mode == "huge_header":
            h.send_response(200)
            h.send_header("Content-Type", HTML)
            h.send_header("X-Padding", "p" * MIB)
            h.send_header("Content-Length", "0")
            return self._end(h, path)
        if mode == "short":
            h.send_response(200)
            h.send_header("Content-Type", HTML)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(_doc("<p>cut</p>")[:100])
            h.close_connection = True
            return None
        h.send_response(200)
        h.send_header("Content-Type", HTML)
        h.send_header("Transfer-Encoding", "chunked")
        if not self._end(h, path):
            return None
        pieces: Iterator[bytes]
        if mode == "endless":
            para = ("<p>" + " ".join(_paragraphs("/endless", "tidal energy", 1)) + "</p>\n").encode() * 64
            pieces = iter(lambda: para, None)
            pause = 0.0
        else:  # trickle
            pieces = iter(lambda: b"<", None)
            pause = 0.2
        try:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(_doc(b"")[:60]), _doc(b"")[:60]))
            for piece in pieces:
                if self._closing.is_set():
                    break
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self._count(path, len(piece))
                if pause:
                    if self._closing.wait(pause):
                        break
        except OSError:
            pass
        h.close_connection = True
        return None

    def _end(self, h: _Handler, path: str) -> bool:
        try:
            h.end_headers()
            return True
        except OSError:
            h.close_connection = True
            return False

    def _send(self, h: _Handler, status: int, data: bytes, ctype: str,
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            h.send_header(k, v)
        try:
            h.end_headers()
            view = memoryview(data)
            for i in range(0, len(data), 256 * 1024):   # in pieces, so a client that stops reading is seen
                h.wfile.write(view[i:i + 256 * 1024])
                self._count(h.path, min(256 * 1024, len(data) - i))
        except OSError:
            h.close_connection = True


def build_all() -> dict[str, float]:
    """Builds every body now; returns the seconds each took (for the figures)."""
    out = {}
    for path, page in PAGES.items():
        if page.mode == "static":
            t = time.perf_counter()
            body(path)
            out[path] = time.perf_counter() - t
    return out
