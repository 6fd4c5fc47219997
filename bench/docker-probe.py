#!/usr/bin/env python3
"""Timing helper of bench/docker.sh and bench/cluster.sh (standard library only).

Subcommands (each prints its results; raw samples go to --samples FILE):

  run-latency   `docker run -d` of N containers, one after another: time from
                just before the command until Glued answers the container's
                name with its address; also how long `docker run` itself took.
  connect-latency
                `docker network connect` / `disconnect` of a pool of running
                containers on a watched network, N times: time until every
                listed DNS server answers the name (connect) or stops
                answering it (disconnect). The first server is the node that
                watches the network, the others are its cluster peers.
  churn         renames a pool of containers on a watched network back and
                forth through the Docker Engine API (unix socket, kept-alive
                connections) at a fixed rate for a fixed time.
  wait-metric   polls a Prometheus gauge until it reaches a value; prints the
                seconds elapsed since --since-ns (a `date +%s%N` taken by the
                caller just before it started the node).
  wait-names    polls a DNS server until it answers every name listed.

DNS polling: one UDP query per server, answered or not within 20 ms, then
1 ms of sleep before the next round: the time resolution is about 1 ms, and
the polling load (<1 000 queries/s) stays small next to the engine's work.
"""

import argparse
import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

POLL_SLEEP = 0.001  # between two polling rounds
RECV_TIMEOUT = 0.02  # per query
DEFAULT_TIMEOUT = 15.0  # longest wait for one change to become visible


# ---- DNS -----------------------------------------------------------------------

def encode_query(qid, name, qtype=1):
    out = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\x00" + struct.pack(">HH", qtype, 1)


def skip_name(msg, pos):
    while True:
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            return pos + 2
        if n == 0:
            return pos + 1
        pos += 1 + n


def parse_a(msg):
    """(rcode, [IPv4 strings]) of an answer, or None when malformed."""
    try:
        _qid, flags, qd, an, _ns, _ar = struct.unpack(">HHHHHH", msg[:12])
        pos = 12
        for _ in range(qd):
            pos = skip_name(msg, pos) + 4
        ips = []
        for _ in range(an):
            pos = skip_name(msg, pos)
            rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", msg[pos:pos + 10])
            pos += 10
            if rtype == 1 and rdlen == 4:
                ips.append(socket.inet_ntoa(msg[pos:pos + 4]))
            pos += rdlen
        return flags & 0xF, ips
    except (struct.error, IndexError):
        return None


class Resolver:
    """One UDP socket per server; query() returns the A addresses (or None)."""

    def __init__(self, servers):
        self.servers = []
        for s in servers:
            host, port = s.rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((host, int(port)))
            sock.settimeout(RECV_TIMEOUT)
            self.servers.append(sock)
        self.qid = random.randrange(65536)

    def query(self, i, name):
        sock = self.servers[i]
        self.qid = (self.qid + 1) & 0xFFFF
        try:
            sock.send(encode_query(self.qid, name))
            deadline = time.monotonic() + RECV_TIMEOUT
            while True:
                msg = sock.recv(4096)
                if msg[:2] == struct.pack(">H", self.qid):
                    break
                if time.monotonic() > deadline:
                    return None
        except (socket.timeout, ConnectionRefusedError, OSError):
            return None
        parsed = parse_a(msg)
        return parsed[1] if parsed and parsed[0] == 0 else []


def wait_all(res, name, want, proc, timeout):
    """Polls every server until want(ips) holds for each. Returns
    ([seconds per server or None], seconds until proc exited or None)."""
    t0 = time.monotonic()
    seen = [None] * len(res.servers)
    proc_done = None
    while True:
        now = time.monotonic()
        if proc is not None and proc_done is None and proc.poll() is not None:
            proc_done = now - t0
        for i in range(len(seen)):
            if seen[i] is None:
                ips = res.query(i, name)
                if ips is not None and want(ips):
                    seen[i] = time.monotonic() - t0
        if all(s is not None for s in seen) and (proc is None or proc_done is not None):
            return seen, proc_done
        if now - t0 > timeout:
            if proc is not None and proc_done is None:
                proc.wait()
                proc_done = time.monotonic() - t0
            return seen, proc_done
        time.sleep(POLL_SLEEP)


# ---- statistics -------------------------------------------------------------------

def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def summary(label, values):
    values = [v * 1000 for v in values if v is not None]
    if not values:
        return f"{label:<40} {'-':>8} {'-':>8} {'-':>8} {'-':>8}   (no sample)"
    return (f"{label:<40} {percentile(values, 50):8.1f} {percentile(values, 99):8.1f} "
            f"{min(values):8.1f} {max(values):8.1f}   n={len(values)}")


def header():
    return f"{'ms':<40} {'p50':>8} {'p99':>8} {'min':>8} {'max':>8}"


def docker(*args, check=True):
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True)


def container_ip(name, net):
    fmt = '{{(index .NetworkSettings.Networks "%s").IPAddress}}' % net
    return docker("inspect", "-f", fmt, name).stdout.strip()


# ---- subcommands ----------------------------------------------------------------------

def cmd_run_latency(a):
    res = Resolver([a.dns])
    run_t, dns_t, wrong = [], [], 0
    rows = []
    for i in range(a.count):
        name = f"{a.prefix}{i}"
        fqdn = f"{name}.{a.domain}"
        proc = subprocess.Popen(
            ["docker", "run", "-d", "--network", a.net, "--name", name, "--label", a.label,
             a.image, "sleep", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen, done = wait_all(res, fqdn, lambda ips: len(ips) > 0, proc, a.timeout)
        if proc.returncode != 0:
            sys.exit(f"docker run {name} failed: {proc.stderr.read().decode().strip()}")
        ip = container_ip(name, a.net)
        got = res.query(0, fqdn) or []
        if got != [ip]:
            wrong += 1
        run_t.append(done)
        dns_t.append(seen[0])
        rows.append(f"{name} docker_run_ms={done * 1000:.1f} "
                    f"resolvable_ms={'timeout' if seen[0] is None else f'{seen[0] * 1000:.1f}'} "
                    f"ip={ip} answer={','.join(got)}")
    if a.samples:
        with open(a.samples, "w") as f:
            f.write("\n".join(rows) + "\n")
    print(header())
    print(summary("docker run -> name resolvable", dns_t))
    print(summary("  of which `docker run -d` itself", run_t))
    after = [d - r for d, r in zip(dns_t, run_t) if d is not None and r is not None]
    print(summary("  resolvable - docker run (can be <0)", after))
    missed = sum(1 for d in dns_t if d is None)
    print(f"timeouts (> {a.timeout:.0f} s): {missed}; answers != docker inspect: {wrong}")


def cmd_connect_latency(a):
    res = Resolver(a.dns)
    pool = a.pool.split(",")
    n = len(a.dns)
    add = [[] for _ in range(n)]
    rem = [[] for _ in range(n)]
    add_cmd, rem_cmd = [], []
    rows = []
    for i in range(a.count):
        c = pool[i % len(pool)]
        fqdn = f"{c}.{a.domain}"
        proc = subprocess.Popen(["docker", "network", "connect", a.net, c],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen, done = wait_all(res, fqdn, lambda ips: len(ips) > 0, proc, a.timeout)
        if proc.returncode != 0:
            sys.exit(f"docker network connect {c}: {proc.stderr.read().decode().strip()}")
        add_cmd.append(done)
        for k in range(n):
            add[k].append(seen[k])
        proc = subprocess.Popen(["docker", "network", "disconnect", a.net, c],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        gone, done2 = wait_all(res, fqdn, lambda ips: len(ips) == 0, proc, a.timeout)
        if proc.returncode != 0:
            sys.exit(f"docker network disconnect {c}: {proc.stderr.read().decode().strip()}")
        rem_cmd.append(done2)
        for k in range(n):
            rem[k].append(gone[k])
        fmt = lambda v: "timeout" if v is None else f"{v * 1000:.1f}"
        rows.append(f"{i} {c} connect_ms={fmt(done)} add_ms=" + ",".join(fmt(s) for s in seen)
                    + f" disconnect_ms={fmt(done2)} remove_ms=" + ",".join(fmt(s) for s in gone))
    if a.samples:
        with open(a.samples, "w") as f:
            f.write("\n".join(rows) + "\n")
    labels = a.labels.split(",") if a.labels else [f"server{k}" for k in range(n)]
    print(header())
    print(summary("`docker network connect` itself", add_cmd))
    for k in range(n):
        print(summary(f"connect -> answered by {labels[k]}", add[k]))
    for k in range(1, n):
        d = [b - x for b, x in zip(add[k], add[0]) if b is not None and x is not None]
        print(summary(f"  {labels[0]} answers -> {labels[k]} answers", d))
    print(summary("`docker network disconnect` itself", rem_cmd))
    for k in range(n):
        print(summary(f"disconnect -> gone at {labels[k]}", rem[k]))
    for k in range(1, n):
        d = [b - x for b, x in zip(rem[k], rem[0]) if b is not None and x is not None]
        print(summary(f"  gone at {labels[0]} -> gone at {labels[k]}", d))
    missed = sum(1 for k in range(n) for v in add[k] + rem[k] if v is None)
    print(f"timeouts (> {a.timeout:.0f} s): {missed}")


class DockerApi:
    """Minimal Docker Engine API client over the unix socket, kept alive."""

    def __init__(self, path):
        self.path = path
        self.conn = None

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        conn = http.client.HTTPConnection("localhost")
        conn.sock = sock
        self.conn = conn

    def post(self, url, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        for attempt in range(2):
            try:
                if self.conn is None:
                    self._connect()
                self.conn.request("POST", url, body=data,
                                  headers={"Content-Type": "application/json"})
                r = self.conn.getresponse()
                r.read()
                return r.status
            except (OSError, http.client.HTTPException):
                self.conn = None
                if attempt == 1:
                    raise
        return 0


def cmd_churn(a):
    """Renames each container of the pool back and forth (NAME <-> NAME-r):
    every rename is one `rename` event and one change of the container's
    records on the watched network, at little cost to the engine (no network
    plumbing, unlike connect/disconnect)."""
    pool = a.pool.split(",")
    workers = min(a.workers, len(pool))
    period = workers / a.rate  # each worker's interval between two changes
    stop_at = time.monotonic() + a.duration
    counts = [0] * workers
    errors = [0] * workers

    def worker(w):
        api = DockerApi(a.socket)
        current = {c: c for c in pool[w::workers]}
        mine = list(current)
        nxt = time.monotonic() + random.random() * period
        i = 0
        while time.monotonic() < stop_at:
            now = time.monotonic()
            if now < nxt:
                time.sleep(nxt - now)
                continue
            nxt = max(nxt + period, now - 1.0)  # no catch-up burst after a stall
            c = mine[i % len(mine)]
            i += 1
            new = c + "-r" if current[c] == c else c
            status = api.post(f"/containers/{current[c]}/rename?name={new}")
            if status == 204:
                current[c] = new
                counts[w] += 1
            else:
                errors[w] += 1
        for c, cur in current.items():  # back to the original names
            if cur != c:
                api.post(f"/containers/{cur}/rename?name={c}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    print(f"{sum(counts)} {sum(errors)} {took:.3f}")


def read_metric(url, metric):
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=1)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    for line in body.splitlines():
        if line.startswith(metric + " "):
            return float(line.split()[1])
    return None


def cmd_wait_metric(a):
    deadline = time.monotonic() + a.timeout
    last = None
    while time.monotonic() < deadline:
        v = read_metric(a.url, a.metric)
        if v is not None:
            last = v
            if v >= a.at_least:
                print(f"{(time.time_ns() - a.since_ns) / 1e9:.3f} {v:.0f}")
                return
        time.sleep(a.interval)
    print(f"timeout {last if last is not None else 'none'}")
    sys.exit(1)


def cmd_wait_names(a):
    res = Resolver([a.dns])
    deadline = time.monotonic() + a.timeout
    pending = list(a.names)
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if not res.query(0, n)]
        if pending:
            time.sleep(0.005)
    if pending:
        print(f"timeout {len(pending)}")
        sys.exit(1)
    print(f"{(time.time_ns() - a.since_ns) / 1e9:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run-latency")
    r.add_argument("--net", required=True)
    r.add_argument("--image", required=True)
    r.add_argument("--prefix", required=True)
    r.add_argument("--label", required=True, help="KEY=VALUE put on every container")
    r.add_argument("--count", type=int, default=50)
    r.add_argument("--dns", required=True, help="ip:port of Glued")
    r.add_argument("--domain", default="glued.internal")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    r.add_argument("--samples")

    c = sub.add_parser("connect-latency")
    c.add_argument("--net", required=True)
    c.add_argument("--pool", required=True, help="comma list of running containers")
    c.add_argument("--count", type=int, default=200)
    c.add_argument("--dns", action="append", required=True,
                   help="ip:port; the watching node first, then its peers")
    c.add_argument("--labels", help="comma list of labels of the --dns servers")
    c.add_argument("--domain", default="glued.internal")
    c.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    c.add_argument("--samples")

    ch = sub.add_parser("churn")
    ch.add_argument("--pool", required=True)
    ch.add_argument("--rate", type=float, default=100.0, help="changes per second")
    ch.add_argument("--duration", type=float, required=True)
    ch.add_argument("--workers", type=int, default=8)
    ch.add_argument("--socket", default="/var/run/docker.sock")

    m = sub.add_parser("wait-metric")
    m.add_argument("--url", required=True)
    m.add_argument("--metric", required=True)
    m.add_argument("--at-least", type=float, required=True)
    m.add_argument("--since-ns", type=int, required=True)
    m.add_argument("--timeout", type=float, default=60.0)
    m.add_argument("--interval", type=float, default=0.005)

    w = sub.add_parser("wait-names")
    w.add_argument("--dns", required=True)
    w.add_argument("--since-ns", type=int, required=True)
    w.add_argument("--timeout", type=float, default=60.0)
    w.add_argument("names", nargs="+")

    a = p.parse_args()
    {
        "run-latency": cmd_run_latency,
        "connect-latency": cmd_connect_latency,
        "churn": cmd_churn,
        "wait-metric": cmd_wait_metric,
        "wait-names": cmd_wait_names,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
