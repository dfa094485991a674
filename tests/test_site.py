"""The crawl-test web site (tests/site.py) itself, over real HTTP with httpx and http.client."""

from __future__ import annotations

import io
import re
import threading
import time
import zlib
from http.client import HTTPConnection

import httpx
import pypdf
import pytest
import trafilatura

from tests.site import DEFAULT_ROBOTS, LEVELS, PDF_SECOND_LINE, PDF_TITLE_LINE, SPECIAL_LINKS, Site


@pytest.fixture(scope="module")
def site():
    with Site(slow_s=1.0, big_bytes=1_000_000) as s:
        yield s


@pytest.fixture
def web():
    with httpx.Client(timeout=10.0) as c:
        yield c


def _links(html: str) -> list[str]:
    return re.findall(r'<a href="([^"]+)"', html)


def test_robots_default_custom_and_absent(site, web):
    r = web.get(site.url("/robots.txt"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == DEFAULT_ROBOTS and "Disallow: /private/" in r.text
    with Site(robots="User-agent: *\nDisallow: /a/\n") as custom, Site(robots=None) as none:
        assert web.get(custom.url("/robots.txt")).text == "User-agent: *\nDisallow: /a/\n"
        assert web.get(none.url("/robots.txt")).status_code == 404


def test_index_links_the_tree_and_every_special_route(site, web):
    r = web.get(site.url("/"))
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert int(r.headers["content-length"]) == len(r.content)
    assert "<title>Fixture site</title>" in r.text and '<html lang="en">' in r.text
    assert '<meta name="date" content="2024-05-01">' in r.text
    links = _links(r.text)
    assert [f"/a/{i}.html" for i in range(1, site.pages + 1)] == [x for x in links if x.startswith("/a/")
                                                                   and "#" not in x]
    assert {href for href, _ in SPECIAL_LINKS} <= set(links)
    assert {"/a/1.html#section-2", "http://other.invalid/elsewhere.html"} <= set(links)
    doc = trafilatura.bare_extraction(r.content, url=str(r.url), with_metadata=True)
    assert doc.title == "Fixture site" and doc.date == "2024-05-01" and len(doc.text.split()) > 300


def test_tree_pages_chain_down_to_depth_4_with_distinct_titles_and_text(site, web):
    titles, paragraphs = set(), set()
    for level in LEVELS:
        for i in range(1, site.pages + 1):
            html = web.get(site.url(f"/{level}/{i}.html")).text
            titles.add(re.search(r"<title>(.*?)</title>", html).group(1))
            paragraphs.update(re.findall(r"<p>(.{200,}?)</p>", html))
            nxt = LEVELS.index(level) + 1
            expected = {"/"} | ({f"/{LEVELS[nxt]}/{i}.html"} if nxt < len(LEVELS) else set())
            assert set(_links(html)) == expected
    assert len(titles) == 4 * site.pages
    assert len(paragraphs) >= 4 * 4 * site.pages  # four long paragraphs per page, none shared


@pytest.mark.parametrize("path,status,ctype", [
    ("/private/secret.html", 200, "text/html"),
    ("/missing.html", 404, "text/html"),
    ("/no/such/page", 404, "text/html"),
    ("/error.html", 500, "text/html"),
    ("/doc.pdf", 200, "application/pdf"),
    ("/image.png", 200, "image/png"),
    ("/broken.html", 200, "text/html"),
    ("/empty.html", 200, "text/html"),
])
def test_special_route_status_and_type(site, web, path, status, ctype):
    r = web.get(site.url(path))
    assert r.status_code == status
    assert r.headers["content-type"].split(";")[0] == ctype
    assert int(r.headers["content-length"]) == len(r.content)


def test_redirects(site, web):
    r = web.get(site.url("/redirect/to-a1"))
    assert r.status_code == 301 and r.headers["location"] == "/a/1.html"
    r = web.get(site.url("/redirect/chain/0"))
    assert r.status_code == 302 and r.headers["location"] == "/redirect/chain/1"
    assert web.get(site.url("/redirect/chain/41")).headers["location"] == "/redirect/chain/42"
    assert str(web.get(site.url("/redirect/to-a1"), follow_redirects=True).url) == site.url("/a/1.html")
    with httpx.Client(max_redirects=5) as c, pytest.raises(httpx.TooManyRedirects):
        c.get(site.url("/redirect/chain/0"), follow_redirects=True)


def test_flaky_fails_then_succeeds(web):
    with Site(flaky_failures=2) as s:
        assert [web.get(s.url("/flaky.html")).status_code for _ in range(4)] == [500, 500, 200, 200]
        s.reset()
        assert web.get(s.url("/flaky.html")).status_code == 500


def test_slow_does_not_block_other_requests(site, web):
    done: dict[str, float] = {}

    def slow() -> None:
        t0 = time.monotonic()
        with httpx.Client(timeout=10.0) as c:
            assert c.get(site.url("/slow.html")).status_code == 200
        done["slow"] = time.monotonic() - t0

    th = threading.Thread(target=slow)
    th.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert web.get(site.url("/a/3.html")).status_code == 200
    assert time.monotonic() - t0 < 0.5
    th.join(5)
    assert done["slow"] >= site.slow_s


def test_big_page_is_chunked_valid_html_of_exact_size(site, web):
    with web.stream("GET", site.url("/big.html")) as r:
        assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.headers
        body = r.read()
    assert len(body) == site.big_bytes == 1_000_000
    assert body.startswith(b"<!DOCTYPE html>") and body.endswith(b"</html>\n")
    # a client that stops reading half-way (a body limit) does not disturb the server
    with web.stream("GET", site.url("/big.html")) as r:
        next(r.iter_bytes(4096))
    assert web.get(site.url("/")).status_code == 200


def test_pdf_and_png_are_real(site, web):
    pdf = web.get(site.url("/doc.pdf")).content
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    text = reader.pages[0].extract_text()
    assert PDF_TITLE_LINE in text and PDF_SECOND_LINE in text
    assert len(reader.pages) == 1
    png = web.get(site.url("/image.png")).content
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos = 8
    kinds = []
    while pos < len(png):  # every chunk's CRC is right and IDAT inflates to 8 rows of 1 + 8*3 bytes
        n = int.from_bytes(png[pos:pos + 4], "big")
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        assert int.from_bytes(png[pos + 8 + n:pos + 12 + n], "big") == zlib.crc32(kind + data)
        if kind == b"IDAT":
            assert len(zlib.decompress(data)) == 8 * 25
        kinds.append(kind)
        pos += 12 + n
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_extraction_of_broken_and_empty_pages(site, web):
    broken = web.get(site.url("/broken.html")).content
    assert b"\x00" in broken and b"\xff" in broken
    doc = trafilatura.bare_extraction(broken, with_metadata=True)
    assert doc is not None and "lighthouse keepers" in doc.text
    empty = web.get(site.url("/empty.html"))
    assert set(_links(empty.text)) == {"/", "/a/1.html"}
    assert trafilatura.bare_extraction(empty.content, with_metadata=True) is None


def test_requests_are_recorded(web):
    with Site() as s:
        t0 = time.monotonic()
        web.get(s.url("/a/2.html"), headers={"User-Agent": "fixture-test/1"})
        web.head(s.url("/b/2.html"))
        web.get(s.url("/nothing"))
        assert [h.path for h in s.requests] == ["/a/2.html", "/b/2.html", "/nothing"]
        hit = s.hits("/a/2.html")[0]
        assert hit.method == "GET" and hit.user_agent == "fixture-test/1" and t0 <= hit.t <= time.monotonic()
        assert s.hits("/b/2.html")[0].method == "HEAD"
        assert s.paths() == {"/a/2.html", "/b/2.html", "/nothing"}
        assert s.host == f"127.0.0.1:{s.port}" and s.url("x") == f"http://{s.host}/x"


def test_keep_alive_serves_many_requests_on_one_connection(site):
    conn = HTTPConnection("127.0.0.1", site.port, timeout=5)
    try:
        for path in ("/", "/missing.html", "/redirect/to-a1", "/doc.pdf", "/big.html", "/a/1.html"):
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            assert not r.will_close, path
        assert conn.sock is not None
    finally:
        conn.close()


def test_expected_html_pages_all_fetch_fine():
    with Site(pages=3, flaky_failures=0, slow_s=0.2, big_bytes=200_000) as s, httpx.Client() as c:
        assert s.expected_html_pages(0) == {s.url("/")}
        assert len(s.expected_html_pages(4)) == 1 + 4 * 3 + 5  # + broken, empty, flaky, slow, big
        assert s.url("/slow.html") not in s.expected_html_pages(4, timeout_s=0.1)
        assert s.url("/big.html") not in s.expected_html_pages(4, max_bytes=100_000)
        for url in s.expected_html_pages(4):
            r = c.get(url)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), url
    with Site(pages=3, robots=None) as s:
        assert s.url("/private/secret.html") in s.expected_html_pages(1)


def test_close_is_prompt_with_a_slow_request_in_flight():
    s = Site(slow_s=30.0)
    outcome: list[object] = []

    def fetch() -> None:
        try:
            outcome.append(httpx.get(s.url("/slow.html"), timeout=10.0).status_code)
        except httpx.HTTPError as exc:  # the server hangs up without answering
            outcome.append(type(exc))

    th = threading.Thread(target=fetch, daemon=True)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 2.0
    th.join(5)
    assert not th.is_alive() and outcome == [httpx.RemoteProtocolError]
