"""A local HTTP server over a folder, with Range requests and injected faults, for tests and benchmarks.

    python -m data_pipelines.transport.fault_server ROOT --port-file F [--rules JSON] [--log F] [--no-ranges]
    with FaultServer(root, rules) as server: server.url("digits/manifest.json"); server.requests()

It runs in a process of its own (as a real server does: forked DataLoader workers of a process that
serves would carry copies of its threads). `rules` maps a file (its path under the root, or `*.tar`
for every tar) to one fault:

    {"status": 404}              answered with that status
    {"drop": true}               the connection closed with no answer
    {"stall": null}              headers, then nothing (for an hour); {"stall": 10}: for 10 s, then closed
    {"swap": "shard-000001.tar"} that file's bytes instead (same folder)
    {"cut": 5000}                the connection closed when the body reaches byte 5000 of the file
    {"rate": 100000}             bytes per second

and when it applies: `"times": n` (the first n requests for the file), `"for": s` (requests within s
seconds of the first one); always when neither is given. Every request is logged as a JSON line
{"t", "name", "start", "fault"} (`FaultServer.requests()`).
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from pathlib import Path
from typing import Optional


class Faults:
    def __init__(self, rules: dict, log_path: Optional[str]):
        self.rules, self.log_path = rules, log_path
        self.lock, self.count, self.first = threading.Lock(), {}, {}

    def rule_for(self, name: str) -> Optional[dict]:
        """The fault of this request for file `name` (counted), or None."""
        rule = self.rules.get(name) or (self.rules.get("*" + Path(name).suffix) if Path(name).suffix else None)
        with self.lock:
            now = time.time()
            n = self.count[name] = self.count.get(name, 0) + 1
            first = self.first.setdefault(name, now)
        if rule is not None and ("times" in rule or "for" in rule):
            if not (n <= rule.get("times", float("inf")) and now - first < rule.get("for", float("inf"))):
                rule = None
        return rule

    def log(self, record: dict) -> None:
        if self.log_path:
            with self.lock, open(self.log_path, "a") as f:
                f.write(json.dumps(dict(record, t=time.time())) + "\n")


def make_handler(root: Path, faults: Faults, ranges: bool):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            path = (root / rel).resolve()
            if root not in path.parents or not path.is_file():
                return self.fail(404, rel, None)
            rule = faults.rule_for(rel) or {}
            fault = next((k for k in ("status", "drop", "stall", "swap", "cut", "rate") if k in rule), None)
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(m.group(1)) if m and ranges else 0
            faults.log({"name": rel, "start": start, "fault": fault})
            if fault == "status":
                return self.fail(rule["status"], rel, fault)
            if fault == "drop":
                self.close_connection = True
                return
            data_path = path.parent / rule["swap"] if fault == "swap" else path
            size = data_path.stat().st_size
            if start > size:
                return self.fail(416, rel, fault)
            self.send_response(206 if m and ranges else 200)
            if m and ranges:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.send_header("Accept-Ranges", "bytes" if ranges else "none")
            self.end_headers()
            self.wfile.flush()
            if fault == "stall":
                time.sleep(rule["stall"] if rule["stall"] is not None else 3600)
                self.close_connection = True
                return
            end = rule["cut"] if fault == "cut" and rule["cut"] > start else size
            rate = rule["rate"] if fault == "rate" else 0
            self.send_body(data_path, start, end, rate)
            if end < size:
                self.close_connection = True

        def send_body(self, path: Path, start: int, end: int, rate: float) -> None:
            piece = max(1, int(rate / 20)) if rate else 1 << 20
            with open(path, "rb") as f:
                f.seek(start)
                while start < end:
                    data = f.read(min(piece, end - start))
                    try:
                        self.wfile.write(data)
                    except OSError:  # the client went away
                        self.close_connection = True
                        return
                    start += len(data)
                    if rate:
                        time.sleep(len(data) / rate)

        def fail(self, status: int, rel: str, fault) -> None:
            if fault is None:
                faults.log({"name": rel, "start": 0, "fault": None, "status": status})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def serve(root: str, rules: dict, port_file: str, log_path: Optional[str], ranges: bool = True) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Path(root).resolve(), Faults(rules, log_path),
                                                                           ranges))
    server.daemon_threads = True
    tmp = port_file + ".tmp"
    Path(tmp).write_text(str(server.server_address[1]))
    os.replace(tmp, port_file)
    server.serve_forever()


class FaultServer:
    """The server above in a child process, over `root`; `url(name)`, `requests()`, `stop()`."""

    def __init__(self, root, rules: Optional[dict] = None, ranges: bool = True):
        self.dir = Path(tempfile.mkdtemp(prefix="fault-server-"))
        weakref.finalize(self, shutil.rmtree, self.dir, True)  # its log stays readable after stop()
        self.log_path, port_file = self.dir / "requests.jsonl", self.dir / "port"
        cmd = [sys.executable, "-m", "data_pipelines.transport.fault_server", str(root), "--port-file", str(port_file),
               "--rules", json.dumps(rules or {}), "--log", str(self.log_path)] + ([] if ranges else ["--no-ranges"])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                           os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        for _ in range(300):
            if port_file.exists():
                self.port = int(port_file.read_text())
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the fault server over {root} did not start")

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def requests(self, name: Optional[str] = None) -> list[dict]:
        """Requests so far, in order; only those for file `name` (its path under the root) if given."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        records = [json.loads(line) for line in lines]
        return [r for r in records if name is None or r["name"] == name]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "FaultServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--port-file", required=True)
    p.add_argument("--rules", default="{}", help="JSON: file name -> fault")
    p.add_argument("--log", default=None, help="append one JSON line per request here")
    p.add_argument("--no-ranges", action="store_true", help="ignore Range headers (answer 200 with the whole file)")
    args = p.parse_args()
    serve(args.root, json.loads(args.rules), args.port_file, args.log, not args.no_ranges)


if __name__ == "__main__":
    main()
