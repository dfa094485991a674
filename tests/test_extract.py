"""Extraction backends and URL normalisation on real documents (the fixture site's bytes, real PDFs,
Debian's python3-doc)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trafilatura
from trafilatura.utils import load_html

from agents.extractor.backends import DEFAULT_BACKENDS, MAX_ANCHOR, MAX_OUTLINKS, extract
from agents.urls import BadURL, LinkResolver, normalize
from testing.system import missing, reason
from tests.fuzz.hostile_site import many_attributes
from tests.site import Site, make_pdf

PYDOC = Path("/usr/share/doc/python3/html")
PYDOC_PAGES = ["index.html", "glossary.html", "genindex-A.html", "py-modindex.html", "library/index.html",
               "library/os.path.html", "tutorial/controlflow.html", "whatsnew/3.11.html", "c-api/intro.html"]


@pytest.fixture(scope="module")
def site():
    with Site(pages=3) as s:
        yield s


@pytest.fixture(scope="module")
def pydoc() -> Path:
    root = PYDOC.resolve()
    if not (root / "index.html").is_file():
        missing(reason("python3-doc"))
    return root


def outlinks_by_the_rules(body: bytes, url: str) -> list[dict]:
    """A page's outlinks the plain way (no <base>, no meta robots here): every href through `normalize` on its
    own, in page order, each URL once, with its first non-empty anchor text."""
    out: list[dict] = []
    seen: dict[str, int] = {}
    for a in load_html(body).iter("a"):
        href = a.get("href")
        if not href or href.startswith("#") or "nofollow" in (a.get("rel") or "").lower().split():
            continue
        try:
            link = normalize(href, url)
        except ValueError:
            continue
        anchor = " ".join(a.text_content().split())[:MAX_ANCHOR]
        if link in seen:
            if anchor and not out[seen[link]]["anchor"]:
                out[seen[link]]["anchor"] = anchor
            continue
        seen[link] = len(out)
        out.append({"url": link, "anchor": anchor})
        if len(out) >= MAX_OUTLINKS:
            break
    return out


def normalized_or_none(href: str, base: str) -> str | None:
    try:
        return normalize(href, base)
    except ValueError:
        return None


def test_html_main_text_metadata_and_outlinks(site):
    out = extract(site.body("/a/1.html"), url=site.url("/a/1.html"), content_type="text/html; charset=utf-8")
    assert out.state == "extracted" and out.error is None
    assert out.title.startswith("Field notes 1") and out.language == "en" and out.published
    assert len(out.text) > 500
    urls = [link["url"] for link in out.outlinks]
    assert site.url("/b/1.html") in urls and len(urls) == len(set(urls))
    assert all(link["anchor"] for link in out.outlinks if link["url"] == site.url("/b/1.html"))


def test_links_honour_base_nofollow_and_meta_robots():
    page = b"""<html lang="de-AT"><head><base href="http://h.example/docs/"><title>T</title>
      <link rel="canonical" href="/canonical.html"></head><body>
      <p>Ein Absatz mit genug Text, damit er als Haupttext gilt, und noch ein wenig mehr Inhalt dazu.</p>
      <a href="page.html#frag">relative to base</a> <a href="page.html">again</a>
      <a rel="nofollow" href="/secret">no</a> <a href="javascript:void(0)">js</a> <a href="mailto:a@b">m</a>
      <a href="HTTP://H.EXAMPLE:80/x/../y.html?utm_source=z&b=2&a=1">messy</a></body></html>"""
    out = extract(page, url="http://h.example/start.html", content_type="text/html")
    assert out.language == "de" and out.canonical_url == "http://h.example/canonical.html"
    assert out.outlinks == [{"url": "http://h.example/docs/page.html", "anchor": "relative to base"},
                            {"url": "http://h.example/y.html?a=1&b=2", "anchor": "messy"}]
    blocked = page.replace(b"<title>", b'<meta name="robots" content="noindex, nofollow"><title>')
    out = extract(blocked, url="http://h.example/start.html", content_type="text/html")
    assert out.state == "failed" and "noindex" in out.error and out.outlinks == []


def test_stored_outlinks_are_those_of_the_rules(site):
    for path in ("/", "/a/1.html", "/b/2.html", "/broken.html", "/empty.html"):
        body, url = site.body(path), site.url(path)
        assert extract(body, url=url, content_type="text/html").outlinks == outlinks_by_the_rules(body, url), path


def test_stored_outlinks_are_those_of_the_rules_on_python_docs(pydoc):
    total = 0
    for path in PYDOC_PAGES:
        body, url = (pydoc / path).read_bytes(), f"http://127.0.0.1:8000/{path}"
        expected = outlinks_by_the_rules(body, url)
        assert extract(body, url=url, content_type="text/html").outlinks == expected, path
        total += len(expected)
    assert total > 1000


EDGE_HREFS = [
    "page.html", "page.html#frag", "page.html #frag", " page.html ", "page.html\t#x", "#top", " #top", "?q=1#x",
    "?utm_source=a&b=2&a=1", "../up.html", "./same.html", "/abs/./x/../y.html", "//other.example/p",
    "//Other.Example:80/p", "HTTP://H.EXAMPLE/X", "http://h.example", "http://h.example:80/x",
    "https://h.example:443/x", "http://h.example:443/x", "http://h.example:8080/x", "http://h.example:080/x",
    "http://h.example:99999/x", "http://h.example:65535/x", "http://h.example:65536/x", "http://h.example:0/x",
    "http://user:pw@h.example/x",
    "http://h.example/a%7eb", "http://h.example/a%2fb", "http://h.example/a;p=1/b", "http://h.example/a b",
    "http://h.example/ä", "http://bücher.de/", "http://xn--bcher-kva.de/x", "http://xn--zz/x", "http://h..example/",
    "http://-h.example/", "http://h.example./x", "http://" + "a" * 70 + ".example/", "http://h.example/a//b",
    "http://h.example/.well-known/x", "http://h.example/a/..", "http://h.example/a/.", "http://h.example/a/...",
    "http://h.example/a|b", "http://h.example/a[b]", "http://h.example/a'b(c)*!$,=:@~", "http://[::1]/x",
    "http://[::1", "http:///x", "http://h.example/\tx", "http://h.example/a?#", "a#b#c", "\x01#frag", "\x01",
    "mailto:a@b", "javascript:void(0)", "ftp://h/x", "data:text/plain,x", "tel:+1", "", "  ", "\u3000page.html",
    "page.html\u3000#x", "HTTPS://h.example/A/B.html", "http://h.example/A/./B", "Page.HTML?b=1&a=2#x", "?",
    "//", "http://h.example/a%20b", "http://h.example?x", "http://h.example#x", "http://h.example:/x",
]
EDGE_BASES = ["http://127.0.0.1:8000/library/os.html", "https://h.example/docs/",
              "http://h.example:8080/a/b.html?x=1#f", "http://H.Example/Dir/", "ftp://h.example/files/"]


def test_link_resolver_answers_as_normalize_does_on_edge_hrefs():
    """LinkResolver (each distinct href once, canonical URLs taken as they are) against `normalize` on its own,
    with hrefs made to sit on the edges of its shortcuts."""
    for base in EDGE_BASES:
        resolver = LinkResolver(base)
        for href in EDGE_HREFS + EDGE_HREFS:   # twice: the second answer comes from what the first worked out
            assert resolver.resolve(href) == normalized_or_none(href, base), (base, href)


def test_link_resolver_answers_as_normalize_does_on_every_href_of_python_docs(pydoc):
    checked = 0
    for path in sorted(pydoc.rglob("*.html"))[::4]:
        base = f"http://127.0.0.1:8000/{path.relative_to(pydoc)}"
        resolver = LinkResolver(base)
        for a in load_html(path.read_bytes()).iter("a"):
            if a.get("href") is not None:
                assert resolver.resolve(a.get("href")) == normalized_or_none(a.get("href"), base), (base, a.get("href"))
                checked += 1
    assert checked > 20_000


NEWS = """<!DOCTYPE html><html lang="en"><head><title>Rivers rise | The Example Courier</title>
<meta property="og:title" content="Rivers rise after a week of rain">
<meta property="og:site_name" content="The Example Courier">
<meta name="author" content="Jane Reporter">
<meta property="article:published_time" content="2024-03-05T08:30:00Z">
<meta name="keywords" content="weather, rivers">
<script type="application/ld+json">{"@context": "https://schema.org", "@type": "NewsArticle",
 "headline": "Rivers rise after a week of rain", "datePublished": "2024-03-05T08:30:00Z",
 "author": {"@type": "Person", "name": "Jane Reporter"}}</script>
<link rel="canonical" href="https://courier.example/2024/03/05/rivers-rise"></head>
<body><nav><a href="/">Home</a> <a href="/world">World</a> <a href="/weather">Weather</a></nav>
<article><h1>Rivers rise after a week of rain</h1><p class="byline">By Jane Reporter, March 5, 2024</p>
<p>Rivers across the valley rose to their highest level in a decade on Tuesday after a week of steady rain,
and the authorities closed three bridges as a precaution while engineers inspected the embankments.</p>
<p>Farmers on the low fields moved their animals to higher ground overnight. "We have seen floods before, but
never this early in the year," said one of them, who has worked the same land for forty years.</p>
<p>Forecasters expect the rain to ease by the weekend, although the rivers will take several days to fall.</p>
</article><footer><a href="/about">About us</a> © The Example Courier</footer></body></html>"""


def test_metadata_kept_is_trafilaturas_title_and_date(site, pydoc):
    """The document keeps a title and a date: both as trafilatura's full metadata pass finds them, and the main
    text as its extraction gives it (without that pass now)."""
    out = extract(NEWS.encode(), url="https://courier.example/world?id=7", content_type="text/html")
    assert (out.state, out.title, out.published) == ("extracted", "Rivers rise after a week of rain", "2024-03-05")
    assert out.canonical_url == "https://courier.example/2024/03/05/rivers-rise" and "Farmers on the low" in out.text
    pages = [(NEWS.encode(), "https://courier.example/world?id=7")]
    pages += [(site.body(p), site.url(p)) for p in ("/", "/a/1.html", "/b/2.html", "/broken.html")]
    pages += [((pydoc / p).read_bytes(), f"http://127.0.0.1:8000/{p}") for p in PYDOC_PAGES[::2]]
    for body, url in pages:
        full = trafilatura.bare_extraction(body, url=url, with_metadata=True)
        out = extract(body, url=url, content_type="text/html")
        assert (out.title, out.published, out.text) == (full.title, full.date, full.text.strip()), url


def test_broken_and_empty_pages_are_recorded_not_dropped(site):
    broken = extract(site.body("/broken.html"), url=site.url("/broken.html"), content_type="text/html")
    assert broken.state == "extracted" and broken.text
    empty = extract(site.body("/empty.html"), url=site.url("/empty.html"), content_type="text/html")
    assert (empty.state, empty.error) == ("failed", "no main text found")
    for garbage in (b"", b"\x00\x01\x02", b"<<<>>>" * 1000):
        out = extract(garbage, url="http://h/x", content_type="text/html")
        assert out.state == "failed" and out.error


def test_a_page_past_its_time_budget_is_stopped_and_failed_with_the_reason(site):
    body = many_attributes(15_000)      # a second of quadratic work in libxml2, htmldate and trafilatura
    out = extract(body, url="http://h/attrs.html", content_type="text/html", time_budget_s=0.05)
    assert out.state == "failed" and out.error == "trafilatura took longer than 0.05 s (the page's time budget): stopped"
    honest = extract(site.body("/a/1.html"), url=site.url("/a/1.html"), content_type="text/html", time_budget_s=5.0)
    assert honest.state == "extracted"       # the next page gets its own budget


def test_pdf_backend_and_its_failures():
    out = extract(make_pdf(("Portable fixture document", "Second line of the PDF")), url="http://h/d.pdf",
                  content_type="application/pdf")
    assert out.state == "extracted" and "Portable fixture document" in out.text
    cut = extract(make_pdf()[:200], url="http://h/d.pdf", content_type="application/pdf", truncated=True)
    assert cut.state == "failed" and "cut at the size cap" in cut.error
    none = extract(make_pdf(), url="http://h/d.pdf", content_type="application/pdf",
                   backends={k: v for k, v in DEFAULT_BACKENDS.items() if k != "application/pdf"})
    assert none.state == "failed" and none.error == "no extraction backend for content type application/pdf"


def test_plain_text_backend_decodes_its_charset():
    out = extract("Grüße aus Köln, ein kurzer Text über nichts Besonderes.".encode("latin-1"), url="http://h/t.txt",
                  content_type="text/plain; charset=iso-8859-1")
    assert out.state == "extracted" and out.text.startswith("Grüße aus Köln")


@pytest.mark.parametrize("raw,expected", [
    ("HTTP://Example.COM:80/a/../b/./c.html?b=2&a=1#frag", "http://example.com/b/c.html?a=1&b=2"),
    ("https://user:pw@x.org:443/a%7eb", "https://x.org/a~b"),
    ("http://x.org/index.html?utm_source=x&id=3&fbclid=9", "http://x.org/index.html?id=3"),
    ("http://bücher.de/ä", "http://xn--bcher-kva.de/%C3%A4"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("raw", ["", "mailto:a@b", "javascript:x()", "ftp://h/x", "http://", "http://h:99999/"])
def test_normalize_rejects_what_cannot_be_fetched(raw):
    with pytest.raises(BadURL):
        normalize(raw)
