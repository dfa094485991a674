"""Transport only: the one package that knows sockets and frames; it imports nothing else of the project.

    codec.py      frames: msgpack envelopes, limits, protocol errors
    messages.py   the message base and registry, and the transport's own types (errors, ack, ping, echo)
    rpc.py        request/reply: server, Lazy Pirate client, peers
    pubsub.py     publish/subscribe
    reactor.py    the single-threaded event loop over sockets and timers
    security.py   CURVE keys and the authenticator
    metrics.py    Prometheus metrics and the /metrics server
"""
