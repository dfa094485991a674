"""Durable stores that several agents and the tools read.

    docstore.py   the document store (SQLite, or PostgreSQL)
    export.py     documents as Parquet
    report.py     the crawl report from the document store
    sql.py        SQLite connections set up one way, and URLs safe to print
    files.py      atomic file replacement for checkpoints
"""
