"""Where shard bytes come from, and how a read survives a bad network.

    locations.py     a folder, an http(s):// URL prefix or a pipe: command template -> where a file is
    policy.py        ReadPolicy (timeouts, retry budget, backoff with jitter) and ReadStats (counters)
    sources.py       one attempt at reading a file: HTTP (urllib, Range) or a pipe: command, never blocking
                     longer than data.read_timeout without progress
    fetch.py         a whole file, retried within data.retry_budget, resumed where it broke off, checked
                     against its sha256, spilled to an unlinked temporary file (one copy of its bytes)
    fault_server.py  a local HTTP server with Range and injected faults, for tests and benchmarks
"""
