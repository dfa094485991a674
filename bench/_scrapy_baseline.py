"""The baseline crawler of bench/crawl.py: a plain Scrapy spider that extracts every HTML page with trafilatura.

    python bench/_scrapy_baseline.py --start URL --out FILE [--depth 5] [--pages 600] [--concurrency 8]
                                     [--timeout 15] [--max-bytes 5000000] [--stats FILE]

It crawls from --start, stays on that host (allowed_domains), obeys robots.txt, follows every http(s)
``a::attr(href)`` of every HTML page (``response.follow``; Scrapy's dupe filter drops fragments and repeats),
and stops at --depth (the start page is depth 0) or after --pages responses (CLOSESPIDER_PAGECOUNT, which
lets requests already in flight finish). Every HTML response goes through
``trafilatura.bare_extraction(html, url=..., with_metadata=True)`` and gives one JSON line in --out:
``{"url", "depth", "status", "title", "text_len", "bytes"}`` (text_len 0 when trafilatura finds no text).
Non-HTML responses are counted by Scrapy but neither extracted nor written. --stats writes Scrapy's final
stats as JSON. Scrapy's defaults stand for everything not set here (retries 2, redirects up to 20, cookies).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from urllib.parse import urlsplit

import scrapy
import trafilatura
from scrapy.crawler import CrawlerProcess
from scrapy.http import HtmlResponse


class BaselineSpider(scrapy.Spider):
    """Follows every link on the start host; extracts each HTML page with trafilatura."""

    name = "baseline"

    def __init__(self, start: str, out: str, **kwargs):
        super().__init__(**kwargs)
        self.start_url = start
        self.allowed_domains = [urlsplit(start).hostname]
        self._out = Path(out).open("w", encoding="utf-8")
        self.pages = 0

    async def start(self):
        # Not start_urls: those requests skip the dupe filter, so the first link back to the start page would
        # fetch it a second time.
        yield scrapy.Request(self.start_url, callback=self.parse)

    def parse(self, response):
        if not isinstance(response, HtmlResponse):
            return
        doc = trafilatura.bare_extraction(response.text, url=response.url, with_metadata=True)
        text = (doc.text or "") if doc is not None else ""
        title = (doc.title or "") if doc is not None else ""
        self._out.write(json.dumps({"url": response.url, "depth": response.meta.get("depth", 0),
                                    "status": response.status, "title": title, "text_len": len(text),
                                    "bytes": len(response.body)}) + "\n")
        self.pages += 1
        for href in response.css("a::attr(href)").getall():
            # mailto:, javascript: and the like would raise in Request() and lose the rest of the page's links
            if urlsplit(response.urljoin(href)).scheme in ("http", "https"):
                yield response.follow(href, callback=self.parse)

    def closed(self, reason: str) -> None:
        self._out.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="start URL")
    ap.add_argument("--out", required=True, help="JSON lines, one per extracted HTML page")
    ap.add_argument("--depth", type=int, default=5, help="DEPTH_LIMIT (start page = 0; default 5)")
    ap.add_argument("--pages", type=int, default=600, help="CLOSESPIDER_PAGECOUNT (default 600)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent requests, all to the one host (default 8)")
    ap.add_argument("--timeout", type=float, default=15.0, help="DOWNLOAD_TIMEOUT in s (default 15)")
    ap.add_argument("--max-bytes", type=int, default=5_000_000, help="DOWNLOAD_MAXSIZE (default 5000000)")
    ap.add_argument("--stats", default=None, help="write Scrapy's final stats here as JSON")
    args = ap.parse_args()

    settings = {
        "ROBOTSTXT_OBEY": True,
        "DEPTH_LIMIT": args.depth,
        "CLOSESPIDER_PAGECOUNT": args.pages,
        "CONCURRENT_REQUESTS": args.concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": args.concurrency,
        "DOWNLOAD_DELAY": 0,
        "DOWNLOAD_TIMEOUT": args.timeout,
        "DOWNLOAD_MAXSIZE": args.max_bytes,
        "LOG_LEVEL": "WARNING",
        "TELNETCONSOLE_ENABLED": False,
    }
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(BaselineSpider)
    process.crawl(crawler, start=args.start, out=args.out)
    process.start()
    if args.stats:
        stats = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in crawler.stats.get_stats().items()}
        Path(args.stats).write_text(json.dumps(stats, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
