"""URL normalisation and scope: one spelling per page, so the seen-set sees repeats.

`normalize` builds on w3lib's canonicalize_url (Scrapy's: sorted query, no fragment, IDNA host,
percent-encoding made canonical, dot segments resolved) and also drops the default port and
tracking parameters (utm_*, gclid, fbclid, ...).
"""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from w3lib.url import canonicalize_url

TRACKING = ("utm_", "gclid", "fbclid", "mc_cid", "mc_eid", "_ga", "yclid", "msclkid")
DEFAULT_PORTS = {"http": 80, "https": 443}


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


def host_of(url: str) -> str:
    """The politeness key: host[:port] of a normalised URL."""
    return urlsplit(url).netloc


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
