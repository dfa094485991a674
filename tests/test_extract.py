"""Extraction backends and URL normalisation on real documents (the fixture site's bytes, real PDFs)."""

from __future__ import annotations

import pytest

from agents.extractor.backends import DEFAULT_BACKENDS, extract
from agents.urls import BadURL, normalize
from tests.site import Site, make_pdf


@pytest.fixture(scope="module")
def site():
    with Site(pages=3) as s:
        yield s


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


def test_broken_and_empty_pages_are_recorded_not_dropped(site):
    broken = extract(site.body("/broken.html"), url=site.url("/broken.html"), content_type="text/html")
    assert broken.state == "extracted" and broken.text
    empty = extract(site.body("/empty.html"), url=site.url("/empty.html"), content_type="text/html")
    assert (empty.state, empty.error) == ("failed", "no main text found")
    for garbage in (b"", b"\x00\x01\x02", b"<<<>>>" * 1000):
        out = extract(garbage, url="http://h/x", content_type="text/html")
        assert out.state == "failed" and out.error


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
