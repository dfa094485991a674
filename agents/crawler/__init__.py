"""The crawl coordinator (kind crawl_coordinator).

    agent.py      the agent: frontier -> polite fetches -> raw store -> acknowledged hand-off to the extractor
    frontier.py   the URL frontier and seen-set (SQLite, or Redis shared by crawlers)
    fetch.py      asynchronous, capped HTTP fetching (httpx)
    rawstore.py   fetched bodies, content-addressed, and one record per fetch
"""
