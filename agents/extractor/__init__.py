"""The extractor (kind extractor).

    agent.py      the agent: extracts each page in worker processes and stores it before acknowledging
    backends.py   HTML (trafilatura), PDF (pypdf) and plain text: main text, title and date, language, links
"""
