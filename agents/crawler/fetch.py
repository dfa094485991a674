"""Asynchronous HTTP fetching for the crawl coordinator.

One asyncio loop in its own thread drives an `httpx.AsyncClient` (connection pooling and
keep-alive per host). The coordinator's reactor thread calls `submit()`; when a fetch ends, an
optional `postprocess` runs on a storage thread (the coordinator writes the raw store there, so
an fsync never stalls a fetch, nor the reactor's heartbeats), as does a fetch's own `parse`
(robots.txt), and the result is handed back on the reactor thread.

Every fetch is capped: total time (`timeout_s`), body size (`max_bytes`: the body is cut there
and marked truncated), and content type (a type outside `accept` is not downloaded at all).
The size cap holds for the decoded body: a gzip, deflate or zstd body is decoded here in bounded
steps (`_Decoder`), so a compression bomb stops at the cap instead of inflating in memory.
Redirects are not followed here: the coordinator schedules the target like any other URL, so
robots.txt, politeness and the seen-set apply to every hop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urljoin

import httpx
import zstandard

from network.reactor import Reactor

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
logging.getLogger("httpcore").setLevel(logging.WARNING)

REDIRECTS = (301, 302, 303, 307, 308)
ACCEPT_ENCODING = "gzip, deflate, zstd"   # what _Decoder decodes; other codings are kept as sent
DECODE_STEP = 64 << 10                     # most bytes one decoding step produces
MAX_ZSTD_WINDOW = 8 << 20                  # RFC 8878: HTTP zstd needs no larger window; larger frames are refused


@dataclass
class FetchResult:
    url: str
    final_url: str
    fetched_at: float
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    body: bytes | None = None
    truncated: bool = False
    elapsed_s: float = 0.0
    error: str | None = None            # timeout, connection refused, ...: no usable response
    redirect_to: str | None = None      # absolute Location of a 3xx
    skipped: str | None = None          # why the body was not downloaded (content type)
    # filled by the coordinator's postprocess on the storage thread
    fetch_id: str | None = None
    content_hash: str | None = None
    body_zstd: bytes | None = None
    parsed: Any = None                  # what submit(parse=...) made of the response, on the storage thread

    @property
    def media_type(self) -> str:
        return self.content_type.split(";", 1)[0].strip().lower()


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


class _Full(Exception):
    """The body reached its size cap: stop reading and decoding."""


class _Capped:
    """Collects a decoded body up to `limit` bytes; more raises _Full (and marks it truncated)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.truncated = False
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        room = self.limit - self.size
        if len(data) > room:
            if room:
                self._parts.append(bytes(data[:room]))
            self.size = self.limit
            self.truncated = True
            raise _Full
        self._parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def value(self) -> bytes:
        return b"".join(self._parts)


class _Zlib:
    """gzip or deflate (zlib-wrapped, or raw as some servers send it), at most DECODE_STEP bytes a step.
    Bytes after the end of the stream are ignored, as httpx does."""

    def __init__(self, wbits: int, out) -> None:
        self.out = out
        self.wbits = wbits
        self.d = zlib.decompressobj(wbits)
        self.started = False

    def write(self, data: bytes) -> None:
        while data and not self.d.eof:
            try:
                piece = self.d.decompress(data, DECODE_STEP)
            except zlib.error:
                if self.started or self.wbits != zlib.MAX_WBITS:
                    raise
                self.wbits = -zlib.MAX_WBITS   # "deflate" without the zlib header
                self.d = zlib.decompressobj(self.wbits)
                continue
            self.started = True
            tail = self.d.unconsumed_tail
            if not piece and len(tail) == len(data):
                break   # no progress: wait for more input
            if piece:
                self.out.write(piece)
            data = tail
        while not self.d.eof:   # output still owed for input already taken (at most a few steps)
            piece = self.d.decompress(b"", DECODE_STEP)
            if not piece:
                break
            self.out.write(piece)

    def flush(self) -> None:
        piece = self.d.flush()
        if piece:
            self.out.write(piece)


class _Zstd:
    """zstd (one or more frames): the decompressor hands `out` DECODE_STEP bytes at a time, so `out`
    stops it at the cap; frames asking for a window over MAX_ZSTD_WINDOW are refused."""

    def __init__(self, out) -> None:
        self.out = out
        self.w = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_writer(
            out, write_size=DECODE_STEP, write_return_read=True)

    def write(self, data: bytes) -> None:
        self.w.write(data)

    def flush(self) -> None:
        pass


class _Decoder:
    """Undoes a Content-Encoding (a list: the last coding applied is undone first) into `sink`, in
    bounded steps. Codings other than gzip, deflate and zstd are left as they are, as httpx does."""

    def __init__(self, content_encoding: str, sink: _Capped) -> None:
        self.encoding = content_encoding.strip() or "identity"
        self.first = sink
        for name in (v.strip().lower() for v in content_encoding.split(",")):
            if name in ("gzip", "x-gzip"):
                self.first = _Zlib(zlib.MAX_WBITS | 16, self.first)
            elif name == "deflate":
                self.first = _Zlib(zlib.MAX_WBITS, self.first)
            elif name == "zstd":
                self.first = _Zstd(self.first)

    def write(self, data: bytes) -> None:
        self.first.write(data)

    def flush(self) -> None:
        layer = self.first
        while not isinstance(layer, _Capped):
            layer.flush()
            layer = layer.out


class Fetcher:
    def __init__(self, reactor: Reactor, *, user_agent: str, timeout_s: float, max_bytes: int,
                 max_connections: int = 64, postprocess: Callable[[FetchResult], None] | None = None):
        self.reactor = reactor
        self.user_agent = user_agent
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_connections = max_connections
        self.postprocess = postprocess
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._client: httpx.AsyncClient | None = None
        self._storage = ThreadPoolExecutor(1, thread_name_prefix="fetch-store")
        self._thread = threading.Thread(target=self._run, name="fetcher", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False,
            headers={"User-Agent": self.user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()

    def submit(self, url: str, done: Callable[[FetchResult], None], *, accept: Callable[[str], bool] | None = None,
               max_bytes: int | None = None, store: bool = True,
               parse: Callable[[FetchResult], Any] | None = None) -> None:
        """Fetches `url`; `done(result)` runs later on the reactor's thread. `accept(media_type)`
        decides whether a body is downloaded (None: any). `parse(result)`, for a response, runs on the storage
        thread and its value goes in `result.parsed` (None if it raised, which is logged): parsing that can take
        seconds (a robots.txt of 500 kB takes Protego about one) must not keep the reactor from its heartbeats."""
        if self._closed:
            return
        asyncio.run_coroutine_threadsafe(self._fetch(url, done, accept, max_bytes or self.max_bytes, store, parse),
                                         self._loop)

    async def _fetch(self, url: str, done: Callable[[FetchResult], None], accept: Callable[[str], bool] | None,
                     max_bytes: int, store: bool, parse: Callable[[FetchResult], Any] | None = None) -> None:
        result = FetchResult(url=url, final_url=url, fetched_at=time.time())
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client.stream("GET", url) as resp:
                    result.status = resp.status_code
                    result.final_url = str(resp.url)
                    result.headers = {k.lower(): v for k, v in resp.headers.items()}
                    result.content_type = resp.headers.get("content-type", "")
                    if resp.status_code in REDIRECTS and "location" in resp.headers:
                        result.redirect_to = urljoin(str(resp.url), resp.headers["location"])
                    elif accept is not None and resp.status_code < 300 and not accept(result.media_type):
                        result.skipped = f"content type {result.media_type or 'missing'} is not crawled"
                    else:
                        # raw bytes, decoded here: httpx's own decoders inflate a whole network read at
                        # once (64 kB of zstd can be gigabytes), before any cap could be checked
                        body = _Capped(max_bytes)
                        decoder = _Decoder(resp.headers.get("content-encoding", ""), body)
                        try:
                            async for chunk in resp.aiter_raw():
                                decoder.write(chunk)
                            decoder.flush()
                        except _Full:
                            pass   # cut at the cap, keep what fits
                        except (zlib.error, zstandard.ZstdError) as exc:
                            raise httpx.DecodingError(f"cannot decode the {decoder.encoding} body: {exc}") from None
                        result.body = body.value()
                        result.truncated = body.truncated
        except TimeoutError:
            result.error = f"timed out after {self.timeout_s:g} s"
        except httpx.TimeoutException as exc:
            result.error = f"timed out ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a fetch must never take the loop down
            log.exception("fetch of %s failed unexpectedly", url)
            result.error = f"{type(exc).__name__}: {exc}"
        result.elapsed_s = time.monotonic() - started
        if store and self.postprocess is not None and result.error is None:
            try:
                await self._loop.run_in_executor(self._storage, self.postprocess, result)
            except Exception as exc:
                log.exception("storing the fetch of %s failed", url)
                result.error = f"cannot store the fetched body: {type(exc).__name__}: {exc}"
        if parse is not None and result.error is None:
            try:
                result.parsed = await self._loop.run_in_executor(self._storage, parse, result)
            except Exception:
                log.exception("parsing the fetch of %s failed", url)
        self.reactor.call_soon_threadsafe(lambda: done(result))

    def run(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Runs `fn()` on the storage thread and `done(value)` later on the reactor's thread (value None if it
        raised, which is logged): work that can take seconds, like parsing a robots.txt another coordinator
        fetched, kept off the reactor."""
        if self._closed:
            return

        def call() -> None:
            try:
                value = fn()
            except Exception:
                log.exception("work on the storage thread failed")
                value = None
            self.reactor.call_soon_threadsafe(lambda: done(value))

        self._storage.submit(call)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._storage.shutdown(wait=True)
