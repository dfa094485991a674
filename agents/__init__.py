"""The agents: one package per kind, named after the kind, and the few modules kinds share.

Kinds (each package has its agent module, with its settings and handlers, beside the libraries only it uses):
    twin/        digital_twin: registry, heartbeats, the start-up gate, the dashboard
    crawler/     crawl_coordinator: frontier, fetching, URLs in, raw store, hand-off to the extractor
    extractor/   extractor: main text, metadata and links (its backends), stored before it acknowledges
    topics/      topic_model: embeddings, near-duplicates, online topics, novelty
    curiosity/   curiosity: the crawl policy that learns from novelty, and the hot cache
    vram/        vram_optimizer (GPU memory leases) and model_manager (GGUF models through llama.cpp)
    probe.py     probe: counts echoes, for the connectivity check
    echo.py      echo: the example kind, and the benchmarks' peer

Shared by several kinds, the only way kinds reach each other (import-linter checks it):
    contracts.py   the messages that cross kinds: crawl -> extract -> store -> score, GPU leases, models
    embedding.py   chunked, pooled sentence embeddings (topics and curiosity); hardware profiles (gpu, cpu, small)
    int8model.py   the embedding model in int8 (OpenVINO) for the cpu profiles: quantised offline at first use, cached
    gpu.py         the device resolver, memory estimates, and a holder's VRAM lease client
    urls.py        URL normalisation (crawler and extractor)
"""
