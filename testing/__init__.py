"""What tests and benchmarks share (never imported by the product).

    harness.py    free ports, config files, agents on threads, `meshctl up` as a process, wait_for,
                  a server that garbles its replies
    procs.py      processes from /proc: alive, CPU time, sessions, descendants
    lab.py        two hosts on one machine (network namespaces): cut, latency, loss
    wire.py       the lab's userspace wire, for kernels without netem
    poollab.py    a crawl over a pool of extractors on two lab hosts (bench/scale.py, the pool chaos tests)
    system.py     the Debian packages the suites use (scripts/debian-packages): skip with the apt line, or fail under CI
"""
