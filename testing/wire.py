"""A userspace wire for the network lab: forwards Ethernet frames between two interfaces with a
delay and a loss rate, for kernels without the netem qdisc.

    python -m testing.wire DEV_A DEV_B [--delay-ms 50] [--loss-pct 0]

Runs inside the lab's middle namespace, where DEV_A and DEV_B are the far ends of the veth
pairs from the two hosts. Every frame read on one side is sent on the other after `delay-ms`
(so a round trip gains twice that), unless dropped with probability `loss-pct`. The hosts'
veth ends must have checksum and segmentation offloads off (the lab does this with ethtool),
so that what is read here is exactly what goes on the wire.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003


def open_raw(dev: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((dev, 0))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def forward(dev_a: str, dev_b: str, *, delay_s: float, loss: float) -> None:
    a, b = open_raw(dev_a), open_raw(dev_b)
    other = {a: b, b: a}
    due: list[tuple[float, int, socket.socket, bytes]] = []
    seq = itertools.count()
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else 0.5
        try:
            readable, _, _ = select.select([a, b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for sock in readable:
            while True:
                try:
                    frame, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING:
                    continue  # our own send, seen again by this socket
                if loss and random.random() < loss:
                    continue
                heapq.heappush(due, (now + delay_s, next(seq), other[sock], frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, frame = heapq.heappop(due)
            try:
                out.send(frame)
            except OSError:
                pass  # the far end is down (the lab cut the link): the frame is lost, like on a wire


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("dev_a")
    parser.add_argument("dev_b")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    args = parser.parse_args(argv)
    print(f"wire {args.dev_a} <-> {args.dev_b}: delay {args.delay_ms}ms, loss {args.loss_pct}%", flush=True)
    forward(args.dev_a, args.dev_b, delay_s=args.delay_ms / 1000, loss=args.loss_pct / 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
