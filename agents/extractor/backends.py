"""Turning a fetched body into a document: main text, metadata and outlinks.

Backends by media type, chosen in the extractor's settings:
  * `trafilatura` (HTML, XHTML): main text, and of its metadata the title and date, the two fields the
    document store keeps; outlinks and their anchor text from the page's own <a href> (base href,
    rel=nofollow and meta robots honoured; agents.urls.LinkResolver); canonical link;
  * `pypdf` (PDF): the text of every page and the document title;
  * `plain` (text/plain): the text as is.
Language comes from the page's own `lang` attribute when it has one, otherwise from py3langid
on the text. Nothing here touches the network or a store: `extract_job` runs in worker
processes, takes plain values and returns plain values, and never raises; a page that cannot
be extracted comes back with state 'failed' and the reason.

A page also fails when its extraction takes longer than a time budget (`time_budget_s`): some
inputs make the parsers quadratic (100 000 attributes on one element take minutes in libxml2,
htmldate and trafilatura). The budget is a SIGALRM timer, so it holds in a worker process (the
main thread) and is checked between Python steps: one long C call (a parse) still runs to its end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import py3langid
import trafilatura
from pypdf import PdfReader
from pypdf.errors import PyPdfError
from trafilatura.metadata import examine_meta, extract_meta_json, extract_title, extract_url, find_date  # htmldate's
from trafilatura.settings import DEFAULT_CONFIG, set_date_params
from trafilatura.utils import load_html

from agents.urls import BadURL, LinkResolver, normalize

log = logging.getLogger(__name__)

DEFAULT_BACKENDS = {
    "text/html": "trafilatura",
    "application/xhtml+xml": "trafilatura",
    "application/pdf": "pypdf",
    "text/plain": "plain",
}
MAX_OUTLINKS = 5000
MAX_ANCHOR = 300
MIN_TEXT_CHARS = 25   # less is navigation debris, not main text
TIME_BUDGET_S = 30.0  # default extraction time per page in a worker process


class ExtractionTimeout(BaseException):
    """The page's time budget ran out. A BaseException, so that the libraries' own `except Exception`
    clauses cannot swallow it and carry on."""


@contextlib.contextmanager
def _time_budget(seconds: float | None) -> Iterator[None]:
    """Raises ExtractionTimeout in this thread after `seconds`; a no-op outside the main thread
    (signals go to the main thread only) or without a budget."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame) -> None:
        raise ExtractionTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Extracted:
    state: str = "extracted"          # extracted | failed
    error: str | None = None
    title: str | None = None
    language: str | None = None
    published: str | None = None
    canonical_url: str | None = None
    text: str | None = None
    outlinks: list[dict] = field(default_factory=list)   # [{"url", "anchor"}], normalised, unique


def _failed(reason: str, **kw) -> Extracted:
    return Extracted(state="failed", error=reason, **kw)


def _language(declared: str | None, text: str | None) -> str | None:
    if declared:
        code = declared.strip().lower().replace("_", "-").split("-", 1)[0]
        if re.fullmatch(r"[a-z]{2,3}", code):
            return code
    if text and len(text) >= 20:
        lang, _score = py3langid.classify(text[:4000])
        return lang
    return None


# --- HTML ---------------------------------------------------------------------------------------


def _links(tree, base_url: str) -> list[dict]:
    base = base_url
    for el in tree.iterfind(".//base[@href]"):
        try:
            base = normalize(el.get("href"), base_url)
        except BadURL:
            pass
        break
    resolve = LinkResolver(base).resolve
    seen: dict[str, int] = {}
    out: list[dict] = []
    for a in tree.iter("a"):
        href = a.get("href")
        if not href or href.startswith("#"):
            continue
        if "nofollow" in (a.get("rel") or "").lower().split():
            continue
        url = resolve(href)
        if url is None:
            continue
        known = seen.get(url)
        if known is not None:   # the first non-empty anchor text wins
            if not out[known]["anchor"]:
                out[known]["anchor"] = " ".join(a.text_content().split())[:MAX_ANCHOR]
            continue
        seen[url] = len(out)
        out.append({"url": url, "anchor": " ".join(a.text_content().split())[:MAX_ANCHOR]})
        if len(out) >= MAX_OUTLINKS:
            break
    return out


def _title_and_date(tree, url: str) -> tuple[str | None, str | None]:
    """The two metadata fields the document store keeps, found as trafilatura's extract_metadata finds them
    (meta tags and JSON-LD, then the page's headings for the title; htmldate for the date, given the page's
    canonical URL), without the rest of that function: its author search (a deep copy of the page and a dozen
    XPath queries), site name, categories, tags and licence were most of its cost, and nothing kept them."""
    meta = examine_meta(tree)
    try:
        meta = extract_meta_json(tree, meta)
    except Exception:   # trafilatura's own guard: bugs in its JSON-LD parsing
        log.debug("JSON-LD metadata of %s unreadable", url, exc_info=True)
    meta.title = meta.title or extract_title(tree)
    date_params = set_date_params(DEFAULT_CONFIG.getboolean("DEFAULT", "EXTENSIVE_DATE_SEARCH"))
    meta.date = find_date(tree, **date_params, url=meta.url or extract_url(tree, url))
    meta.clean_and_trim()
    return meta.title, meta.date


def _robots_meta(tree) -> set[str]:
    words: set[str] = set()
    for el in tree.iterfind(".//meta[@name]"):
        if el.get("name", "").lower() in ("robots", "agent-mesh"):
            words.update(w.strip().lower() for w in (el.get("content") or "").split(","))
    return words


def extract_html(body: bytes, url: str, content_type: str) -> Extracted:
    tree = load_html(body)
    if tree is None:
        return _failed("not parsable as HTML")
    robots = _robots_meta(tree)
    outlinks = [] if "nofollow" in robots or "none" in robots else _links(tree, url)
    canonical = None
    for el in tree.iterfind(".//link[@rel]"):
        if el.get("rel", "").lower() == "canonical" and el.get("href"):
            try:
                canonical = normalize(el.get("href"), url)
            except BadURL:
                pass
            break
    declared = tree.get("lang") or tree.get("{http://www.w3.org/XML/1998/namespace}lang")
    title_el = tree.find(".//title")
    page_title = " ".join(title_el.text_content().split()) if title_el is not None else None
    if "noindex" in robots or "none" in robots:
        return _failed("the page asks not to be indexed (meta robots noindex)", outlinks=outlinks,
                       canonical_url=canonical, title=page_title)
    doc = trafilatura.bare_extraction(tree, url=url)   # main text only: no metadata pass (_title_and_date)
    text = (doc.text or "").strip() if doc is not None else ""
    title, published = _title_and_date(tree, url) if doc is not None else (None, None)
    title = title or page_title
    if len(text) < MIN_TEXT_CHARS:
        return _failed("no main text found", outlinks=outlinks, canonical_url=canonical, title=title,
                       language=_language(declared, None))
    return Extracted(title=title, language=_language(declared, text), published=published, canonical_url=canonical,
                     text=text, outlinks=outlinks)


# --- other types --------------------------------------------------------------------------------


def extract_pdf(body: bytes, url: str, content_type: str) -> Extracted:
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(body))
        text = "\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
        meta = reader.metadata
        title = (meta.title if meta is not None else None) or None
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        return _failed(f"unreadable PDF: {type(exc).__name__}: {exc}"[:500])
    if not text:
        return _failed("the PDF has no extractable text (scanned pages?)", title=title)
    return Extracted(title=title, language=_language(None, text), text=text)


def extract_plain(body: bytes, url: str, content_type: str) -> Extracted:
    m = re.search(r"charset=([\w.-]+)", content_type, re.I)
    try:
        text = body.decode(m.group(1) if m else "utf-8", errors="replace").strip()
    except LookupError:
        text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return _failed("empty text")
    first = text.splitlines()[0].strip()[:200]
    return Extracted(title=first or None, language=_language(None, text), text=text)


BACKENDS: dict[str, Callable[[bytes, str, str], Extracted]] = {
    "trafilatura": extract_html,
    "pypdf": extract_pdf,
    "plain": extract_plain,
}


def extract(body: bytes, *, url: str, content_type: str, backends: dict[str, str] | None = None,
            truncated: bool = False, time_budget_s: float | None = None) -> Extracted:
    backends = DEFAULT_BACKENDS if backends is None else backends
    media = content_type.split(";", 1)[0].strip().lower()
    name = backends.get(media)
    if name is None:
        return _failed(f"no extraction backend for content type {media or '(none)'}")
    try:
        with _time_budget(time_budget_s):
            out = BACKENDS[name](body, url, content_type)
    except ExtractionTimeout:
        log.warning("extraction of %s stopped after %g s", url, time_budget_s)
        out = _failed(f"{name} took longer than {time_budget_s:g} s (the page's time budget): stopped")
    except Exception as exc:  # a bad page must never take the extractor down
        log.warning("extraction of %s failed: %s", url, exc, exc_info=True)
        out = _failed(f"{name} failed: {type(exc).__name__}: {exc}"[:500])
    if truncated and out.state == "failed":
        out.error = f"{out.error} (the body was cut at the size cap)"
    return out


def extract_job(body: bytes, url: str, content_type: str, backends: dict[str, str], truncated: bool,
                time_budget_s: float | None = TIME_BUDGET_S) -> dict:
    """Worker-process entry point: plain values in, a plain dict out."""
    return asdict(extract(body, url=url, content_type=content_type, backends=backends, truncated=truncated,
                          time_budget_s=time_budget_s))


def warm_up() -> None:
    """A worker's initializer. Finding it imports this module, and with it trafilatura, pypdf and
    py3langid, before the first page arrives; there is nothing else to do."""
