#!/usr/bin/env python3
"""RSS of the gateway before, during and after a burst of idle keep-alive connections.

Run with: python3 benches/tools/conn_burst_rss.py [BINARY] [CONNECTIONS]
(default: target/debug/switchboard, 10000). Needs `ulimit -n` above CONNECTIONS + 100
(the gateway and this script each hold one descriptor per connection).

Starts `switchboard serve` on a free 127.0.0.1 port with a mock-only config (no
request log, a store in a temp dir, header/idle timeouts long enough to keep every
connection open), then:
  1. idle:   VmRSS after a few warm-up requests;
  2. during: opens CONNECTIONS connections, each sends one GET /healthz and reads its
             answer, then stays open, idle (keep-alive);
  3. after:  closes them all and samples VmRSS every second until it has not moved
             by more than 1 MiB for 5 s (at most 60 s).
Extra environment (e.g. MIMALLOC_PURGE_DELAY=0) is passed on to the gateway.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/switchboard"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 10000

CONFIG = """
[server]
header_timeout_secs = 600
idle_timeout_secs = 600
max_connections = 100000

[store]
url = "sqlite://{db}"

[logging]
sink = "none"

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock/echo"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
"""

REQ = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(port, sock=None):
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(REQ)
    data = b""
    while not data.endswith(b"ok"):
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed")
        data += chunk
    return s


def main():
    tmp = tempfile.mkdtemp(prefix="switchboard-burst-")
    cfg = os.path.join(tmp, "switchboard.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(db=os.path.join(tmp, "switchboard.db")))
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "serve", "--config", cfg, "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(tmp, "gateway.log"), "w"),
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                get(port).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        for _ in range(100):
            get(port).close()
        time.sleep(2)
        idle = rss_kib(proc.pid)
        socks = [get(port) for _ in range(N)]
        time.sleep(2)
        during = rss_kib(proc.pid)
        for s in socks:
            s.close()
        socks = None
        samples = [rss_kib(proc.pid)]
        stable = 0
        for _ in range(60):
            time.sleep(1)
            samples.append(rss_kib(proc.pid))
            stable = stable + 1 if abs(samples[-1] - samples[-2]) <= 1024 else 0
            if stable >= 5:
                break
        after = samples[-1]
        mib = lambda k: k / 1024
        print(f"connections: {N}")
        print(f"idle:   {mib(idle):7.1f} MiB")
        print(f"during: {mib(during):7.1f} MiB  (+{(during - idle) / N:.1f} KiB per connection)")
        print(f"after:  {mib(after):7.1f} MiB  ({len(samples) - 1} s to settle; samples MiB: "
              + ", ".join(f"{mib(s):.0f}" for s in samples) + ")")
        # One more small burst of requests after the settle: does RSS come back down
        # once the worker threads allocate and free again (mimalloc purges lazily)?
        for _ in range(200):
            get(port).close()
        time.sleep(2)
        print(f"after 200 more requests: {mib(rss_kib(proc.pid)):7.1f} MiB")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
