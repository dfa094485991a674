"""URL normalisation and scope: one spelling per page, so the seen-set sees repeats.

`normalize` builds on w3lib's canonicalize_url (Scrapy's: sorted query, no fragment, IDNA host,
percent-encoding made canonical, dot segments resolved) and also drops the default port and
tracking parameters (utm_*, gclid, fbclid, ...). `LinkResolver` gives the same answers for the
hundreds of hrefs of one page at a fraction of the cost (the extractor's outlinks).
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from w3lib.url import canonicalize_url

TRACKING = ("utm_", "gclid", "fbclid", "mc_cid", "mc_eid", "_ga", "yclid", "msclkid")
DEFAULT_PORTS = {"http": 80, "https": 443}

# A URL that `normalize` gives back unchanged (bar the default port and an empty path): lower-case http(s), an
# ASCII host name in lower case (IDNA leaves it alone), a port without a leading zero, a path of characters that
# w3lib neither quotes nor unquotes (no '%', no ';' parameters), no credentials, query or fragment. Paths with
# dot segments are left to `normalize` (_DOT_SEGMENT).
_CANONICAL = re.compile(r"(https?)://([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::([1-9][0-9]{0,4}))?"
                        r"(/[A-Za-z0-9\-._~!$&'()*+,=:@/]*)?")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")


class BadURL(ValueError):
    """Not an http(s) URL we can fetch; the message says why."""


def normalize(url: str, base: str | None = None) -> str:
    """The canonical form of `url` (resolved against `base` when relative); BadURL if unusable."""
    url = url.strip()
    if not url:
        raise BadURL("empty URL")
    if base is not None:
        url = urljoin(base, url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BadURL(f"unparsable URL {url[:200]!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BadURL(f"not an http(s) URL: {url[:200]!r}")
    if not parts.hostname:
        raise BadURL(f"no host in {url[:200]!r}")
    try:
        port = parts.port
    except ValueError:
        raise BadURL(f"bad port in {url[:200]!r}") from None
    query = parts.query
    if query:
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not k.lower().startswith(TRACKING)]
        query = urlencode(kept)
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()  # credentials never go into the frontier
    if port == DEFAULT_PORTS[scheme]:
        netloc = netloc.rsplit(":", 1)[0]
    try:
        return canonicalize_url(urlunsplit(SplitResult(scheme, netloc, parts.path or "/", query, "")))
    except (ValueError, UnicodeError) as exc:
        raise BadURL(f"cannot normalise {url[:200]!r}: {exc}") from None


class LinkResolver:
    """`normalize(href, base)` for the hrefs of one page, the same answers at a fraction of the cost.

    A page repeats its hrefs (navigation, the same target with another #fragment), so each distinct href,
    fragment aside, is worked out once; and most resolve to a URL that is already canonical (a plain path on a
    plain host), which is taken as it is instead of going through w3lib. Anything else goes through `normalize`.
    tests/test_extract.py holds the two to the same answers on real pages.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self._done: dict[str, str | None] = {}

    def resolve(self, href: str) -> str | None:
        """The normalised URL of `href` on this page, or None where `normalize` refuses it."""
        key = href.strip()
        cut = key.find("#")
        # 'page.html#a' is 'page.html': the fragment never reaches the result. Not so when nothing is left,
        # or when whitespace is left at the end (normalize would strip it; before the '#' it is kept)
        if cut > 0 and not key[cut - 1].isspace():
            key = key[:cut]
        if key not in self._done:
            self._done[key] = self._resolve(key)
        return self._done[key]

    def _resolve(self, key: str) -> str | None:
        try:
            m = _CANONICAL.fullmatch(urljoin(self.base, key)) if key else None   # '': normalize refuses it
            if m is not None:
                scheme, host, port, path = m.groups()
                if not (path and _DOT_SEGMENT.search(path)) and (port is None or int(port) <= 65535):
                    if port is not None and int(port) != DEFAULT_PORTS[scheme]:
                        host = f"{host}:{port}"
                    return f"{scheme}://{host}{path or '/'}"
            return normalize(key, self.base)
        except ValueError:   # BadURL, or urljoin's own (an unclosed IPv6 bracket)
            return None


def host_of(url: str) -> str:
    """The politeness key: host[:port] of a normalised URL."""
    return urlsplit(url).netloc


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
