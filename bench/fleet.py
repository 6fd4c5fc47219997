#!/usr/bin/env python3
"""Driver of bench/fleet.sh (standard library only; root; Linux).

NODES real `glued run` processes, each in its own network namespace, on a
switch namespace holding two bridges joined by a trunk veth (nodes 0 ..
NODES/2-1 on one bridge, the rest on the other; cutting the trunk is a real
half/half partition). mDNS off, every node bootstrapped from the seed (node
0) only, one static record per node. Node 1 also watches a Docker network
(--net) through the engine's unix socket, so that `docker network connect`
of a pool container is a record change made at runtime.

Phases, in order; each prints key=value lines on stdout:
  form     seed started and answering, then every other node back to back;
           form_s = last start -> every node holds every origin (/records).
  change   CHANGES connects/disconnects of a pool container on --net: per
           change, the time from node 1 answering (or no longer answering)
           the name to every node doing so (change_p50_ms, change_p99_ms:
           the replication part), and from just before the docker command
           (change_e2e_p99_ms, engine included). DNS of every node polled
           every ~1 ms.
  heal     trunk cut for PARTITION s (> lease; heal_dropped_s: when each half
           had dropped the other's origins), then restored; heal_s = trunk
           up -> every node holds every origin.
  restart  a non-seed node stopped (SIGTERM), QUIET s of quiet, restarted
           with a changed record; restart_s = start -> every node holds its
           new record and it holds every origin.
  resources sampled every second through all phases: RSS per node
           (rss_median_mib, rss_max_mib at the end, rss_peak_mib = highest
           VmHWM) and eth0 bytes (in + out) per node per second
           (bytes_per_node_s_median over the idle window after forming,
           bytes_per_node_s_peak = highest one-second figure of any node in
           any phase). eth0 carries only gossip: the DNS polling and the
           HTTP reads stay on each namespace's loopback.
A phase that does not converge within its bound prints `<key>=timeout` and
a `lacking ...` line on stderr, and the run goes on.
"""

import argparse
import base64
import ctypes
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
HTTP_PORT = 9253
GOSSIP_PORT = 9254
POLL_SLEEP = 0.001  # between DNS polling rounds
DNS_WAIT = 0.02  # an unanswered query is given up after this
HTTP_POLL = 0.1  # between /records rounds
SAMPLE_EVERY = 1.0  # resource sampling period
IDLE_WINDOW = 10.0  # seconds of idle traffic measured after forming
FORM_BOUND = 120.0
CHANGE_BOUND = 10.0
HEAL_BOUND = 120.0
RESTART_BOUND = 120.0

libc = ctypes.CDLL(None, use_errno=True)
HOST_NS = os.open("/proc/self/ns/net", os.O_RDONLY)


def log(msg):
    print(f"== {msg}", file=sys.stderr, flush=True)


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setns(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def in_ns(ns, fn):
    """Runs fn() with the calling thread in namespace ns (sockets stay there)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        setns(fd)
        return fn()
    finally:
        setns(HOST_NS)
        os.close(fd)


def dns_query(qid, name):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)


def dns_answers(reply):
    """(qid, rcode, ancount) of a reply, or None."""
    if len(reply) < 12:
        return None
    qid, flags, _, an, _, _ = struct.unpack(">HHHHHH", reply[:12])
    return qid, flags & 0xF, an


class Node:
    def __init__(self, fleet, i):
        self.i = i
        self.name = f"n{i}"
        self.ns = f"{fleet.tag}-n{i}"
        self.ip = f"10.78.{i // 250}.{1 + i % 250}"
        self.dir = os.path.join(fleet.work, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.records = {(self.name, f"10.99.{i // 250}.{1 + i % 250}")}
        self.proc = None
        self.id = None
        self.sock = None  # UDP socket in the node's namespace, for DNS

    def dns_addr(self):
        return (self.ip, 53)


class Fleet:
    def __init__(self, args):
        self.args = args
        self.tag = f"gfb-{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.work = args.work
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.nodes = []
        self.samples = []  # (t, phase, [(rss_kib, hwm_kib, eth0_bytes) per live node])
        self.phase = "start"
        self.stop_sampling = threading.Event()
        # One /16 subnet for every node, so that 250+ nodes fit.
        ip("netns", "add", self.switch)
        for cmd in ["link set lo up", "link add ba type bridge", "link add bb type bridge",
                    "link add ta type veth peer name tb", "link set ta master ba",
                    "link set tb master bb", "link set ba up", "link set bb up",
                    "link set ta up", "link set tb up"]:
            ip("-n", self.switch, *cmd.split())
        for i in range(args.nodes):
            n = Node(self, i)
            self.nodes.append(n)
            ip("netns", "add", n.ns)
            ip("link", "add", f"p{i}", "netns", self.switch, "type", "veth", "peer", "name",
               "eth0", "netns", n.ns)
            bridge = "ba" if i < args.nodes // 2 else "bb"
            ip("-n", self.switch, "link", "set", f"p{i}", "master", bridge, "up")
            ip("-n", n.ns, "link", "set", "lo", "up")
            ip("-n", n.ns, "addr", "add", f"{n.ip}/16", "dev", "eth0")
            ip("-n", n.ns, "link", "set", "eth0", "up")
            open(os.path.join(n.dir, "glued.toml"), "w").close()
            n.id = subprocess.run([args.glued, "id"], env={"GLUED_DATA_DIR": n.dir,
                                  "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                  check=True, capture_output=True, text=True,
                                  cwd=n.dir).stdout.split()[0]

            def mk():
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                return s
            n.sock = in_ns(n.ns, mk)

    def cleanup(self):
        for n in self.nodes:
            self.kill(n)
        for n in self.nodes:
            subprocess.run(["ip", "netns", "del", n.ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)

    def kill(self, n, sig=signal.SIGKILL):
        if n.proc is None:
            return
        n.proc.send_signal(sig)
        try:
            n.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait()
        n.proc = None

    def start(self, n):
        with open(os.path.join(n.dir, "glued.toml"), "w") as f:
            for name, addr in sorted(n.records):
                f.write(f'[[records]]\nname = "{name}"\nip = "{addr}"\n')
        seed = self.nodes[0]
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "GLUED_DNS_BIND": f"{n.ip}:53",
            "GLUED_DNS_THREADS": "1",
            "GLUED_HTTP_BIND": f"127.0.0.1:{HTTP_PORT}",
            "GLUED_GOSSIP_BIND": f"{n.ip}:{GOSSIP_PORT}",
            "GLUED_NODE_NAME": n.name,
            "GLUED_UPSTREAMS": "none",
            "GLUED_DATA_DIR": n.dir,
            "GLUED_MDNS": "false",
            "GLUED_LEASE_SECS": str(self.args.lease),
            "GLUED_CLUSTER_SECRET": self.key,
            "RUST_LOG": os.environ.get("GLUED_LOG", "info,iroh=warn,iroh_gossip=warn"),
        }
        if n.i == 1 and self.args.net:
            env["GLUED_NETWORK_NAME"] = self.args.net
            env["GLUED_DOCKER_HOST"] = "unix:///var/run/docker.sock"
        else:
            env["GLUED_NETWORK_NAME"] = f"{self.tag}-absent"
            env["GLUED_DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
        if n.i != 0:
            env["GLUED_BOOTSTRAP_PEERS"] = f"{seed.id}@{seed.ip}:{GOSSIP_PORT}"
        logf = open(os.path.join(n.dir, "glued.log"), "a")
        n.proc = subprocess.Popen(
            ["ip", "netns", "exec", n.ns, self.args.glued, "run", "--config",
             os.path.join(n.dir, "glued.toml")],
            env=env, stdout=subprocess.DEVNULL, stderr=logf,
            preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL))
        logf.close()

    def records(self, n):
        """origin id -> set of (name, address) of node n's /records, or None."""
        def get():
            s = socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=2)
            return s
        try:
            s = in_ns(n.ns, get)
            s.sendall(b"GET /records HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            body = data.split(b"\r\n\r\n", 1)[1]
            view = {}
            for r in json.loads(body):
                st = view.setdefault(r["origin"], set())
                for name in r["names"]:
                    for a in r["addresses"]:
                        st.add((name, a))
            return view
        except (OSError, ValueError, IndexError):
            return None

    def live(self):
        return [n for n in self.nodes if n.proc is not None]

    def faults(self, n, expected):
        view = self.records(n)
        if view is None:
            return ["no /records"]
        out = []
        for m in expected:
            got = view.get(m.id)
            if got is None:
                out.append(f"lacks {m.name}")
            elif got != m.records:
                out.append(f"stale {m.name}")
        ids = {m.id for m in expected}
        for m in self.nodes:
            if m.id in view and m.id not in ids:
                out.append(f"holds {m.name}")
        return out

    def wait_converged(self, since, bound, reach=None):
        """Seconds from `since` until every live node holds exactly the
        records of every node it reaches; None after `bound`."""
        reach = reach or (lambda n: self.live())
        while True:
            bad = {}
            for n in self.live():
                f = self.faults(n, reach(n))
                if f:
                    bad[n.name] = f
            now = time.monotonic()
            if not bad:
                return now - since
            if now - since > bound:
                for name, f in bad.items():
                    log(f"lacking {name}: {', '.join(f[:8])}{' ...' if len(f) > 8 else ''}")
                return None
            time.sleep(HTTP_POLL)

    def wait_up(self, n, bound=30.0):
        end = time.monotonic() + bound
        while self.records(n) is None:
            if time.monotonic() > end:
                raise SystemExit(f"{n.name} does not answer HTTP after {bound} s")
            time.sleep(0.05)

    # ---- resources ---------------------------------------------------------

    def sampler(self):
        while not self.stop_sampling.is_set():
            row = []
            for n in self.live():
                try:
                    pid = n.proc.pid
                    st = open(f"/proc/{pid}/status").read()
                    rss = int(st.split("VmRSS:")[1].split()[0])
                    hwm = int(st.split("VmHWM:")[1].split()[0])
                    dev = open(f"/proc/{pid}/net/dev").read()
                    line = [ln for ln in dev.splitlines() if ln.strip().startswith("eth0:")][0]
                    f = line.split(":", 1)[1].split()
                    row.append((n.i, rss, hwm, int(f[0]) + int(f[8])))
                except (OSError, IndexError, ValueError, AttributeError):
                    pass
            self.samples.append((time.monotonic(), self.phase, row))
            self.stop_sampling.wait(SAMPLE_EVERY)

    def rates(self, t0=None, t1=None):
        """Per node per second eth0 byte rates between consecutive samples."""
        out = []
        for (ta, _, ra), (tb, phase, rb) in zip(self.samples, self.samples[1:]):
            if (t0 is not None and ta < t0) or (t1 is not None and tb > t1):
                continue
            before = {i: b for i, _, _, b in ra}
            for i, _, _, b in rb:
                if i in before and b >= before[i]:
                    out.append(((b - before[i]) / (tb - ta), phase, i))
        return out

    # ---- DNS ---------------------------------------------------------------

    def poll_until(self, name, want_answer, nodes, bound):
        """Per node, the monotonic time it first answered `name` with an A
        record (want_answer) or with none (not want_answer); missing ones
        after `bound` are left out."""
        done = {}
        qid = random.randrange(65536)
        end = time.monotonic() + bound
        pkt = {}
        while len(done) < len(nodes) and time.monotonic() < end:
            qid = (qid + 1) & 0xFFFF
            pending = [n for n in nodes if n.i not in done]
            for n in pending:
                pkt[n.i] = dns_query(qid, name)
                try:
                    n.sock.sendto(pkt[n.i], n.dns_addr())
                except OSError:
                    pass
            deadline = time.monotonic() + DNS_WAIT
            waiting = {n.i: n for n in pending}
            while waiting and time.monotonic() < deadline:
                for i, n in list(waiting.items()):
                    try:
                        reply = n.sock.recv(4096)
                    except BlockingIOError:
                        continue
                    a = dns_answers(reply)
                    if a is None or a[0] != qid:
                        continue
                    del waiting[i]
                    if (a[2] > 0) == want_answer:
                        done[i] = time.monotonic()
                time.sleep(0.0002)
            time.sleep(POLL_SLEEP)
        return done


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def out(key, value):
    print(f"{key}={value}", flush=True)


def phase_form(f):
    f.phase = "form"
    f.start(f.nodes[0])
    f.wait_up(f.nodes[0])
    for n in f.nodes[1:]:
        f.start(n)
    last = time.monotonic()
    took = f.wait_converged(last, FORM_BOUND)
    out("form_s", f"{took:.2f}" if took is not None else "timeout")
    return took is not None


def phase_idle(f):
    f.phase = "idle"
    t0 = time.monotonic()
    time.sleep(IDLE_WINDOW)
    rates = [r for r, _, _ in f.rates(t0, time.monotonic())]
    out("bytes_per_node_s_idle_median", f"{statistics.median(rates):.0f}" if rates else "nan")


def phase_change(f, args):
    f.phase = "change"
    changer = f.nodes[1]
    pool = args.pool.split(",")
    lat, e2e, failed = [], [], 0
    for k in range(args.changes):
        c = pool[k % len(pool)]
        for verb, want in (("connect", True), ("disconnect", False)):
            t0 = time.monotonic()
            subprocess.run(["docker", "network", verb, args.net, c], check=True,
                           capture_output=True)
            first = f.poll_until(c, want, [changer], CHANGE_BOUND)
            if changer.i not in first:
                failed += 1
                continue
            t1 = first[changer.i]
            others = [n for n in f.live() if n is not changer]
            seen = f.poll_until(c, want, others, CHANGE_BOUND)
            if len(seen) < len(others):
                failed += 1
                missing = [n.name for n in others if n.i not in seen]
                log(f"change {k} {verb}: not seen by {', '.join(missing)}")
                continue
            last = max(seen.values())
            if k >= args.warmup:
                lat.append((last - t1) * 1000)
                e2e.append((last - t0) * 1000)
    out("changes", len(lat))
    out("change_failed", failed)
    out("change_p50_ms", f"{pct(lat, 50):.1f}")
    out("change_p99_ms", f"{pct(lat, 99):.1f}")
    out("change_max_ms", f"{max(lat) if lat else float('nan'):.1f}")
    out("change_e2e_p50_ms", f"{pct(e2e, 50):.1f}")
    out("change_e2e_p99_ms", f"{pct(e2e, 99):.1f}")


def phase_heal(f, args):
    f.phase = "partition"
    half = len(f.nodes) // 2
    side = lambda n: n.i >= half  # noqa: E731
    cut = time.monotonic()
    for end in ("ta", "tb"):
        ip("-n", f.switch, "link", "set", end, "down")
    dropped = f.wait_converged(cut, args.partition + 30,
                               reach=lambda n: [m for m in f.live() if side(m) == side(n)])
    out("heal_dropped_s", f"{dropped:.2f}" if dropped is not None else "timeout")
    time.sleep(max(0.0, args.partition - (time.monotonic() - cut)))
    f.phase = "heal"
    up = time.monotonic()
    for end in ("ta", "tb"):
        ip("-n", f.switch, "link", "set", end, "up")
    took = f.wait_converged(up, HEAL_BOUND)
    out("partition_s", f"{up - cut:.1f}")
    out("heal_s", f"{took:.2f}" if took is not None else "timeout")


def phase_restart(f, args):
    f.phase = "quiet"
    x = f.nodes[-1]
    f.kill(x, signal.SIGTERM)
    time.sleep(args.quiet)
    x.records = {(x.name, "10.98.0.1"), (f"{x.name}-new", "10.98.0.2")}
    f.phase = "restart"
    t0 = time.monotonic()
    f.start(x)
    took = f.wait_converged(t0, RESTART_BOUND)
    out("quiet_s", args.quiet)
    out("restart_s", f"{took:.2f}" if took is not None else "timeout")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--glued", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--nodes", type=int, default=32)
    p.add_argument("--lease", type=int, default=6)
    p.add_argument("--partition", type=float, default=14.0)
    p.add_argument("--quiet", type=float, default=600.0)
    p.add_argument("--changes", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--net", default="")
    p.add_argument("--pool", default="")
    p.add_argument("--phases", default="form,idle,change,heal,restart")
    args = p.parse_args()
    phases = args.phases.split(",")
    f = Fleet(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sampler = threading.Thread(target=f.sampler, daemon=True)
    try:
        sampler.start()
        out("nodes", args.nodes)
        out("lease_s", args.lease)
        if "form" in phases and not phase_form(f):
            log("the fleet did not form: the figures below start from a partial fleet")
        if "idle" in phases:
            phase_idle(f)
        if "change" in phases and args.net and args.pool:
            phase_change(f, args)
        if "heal" in phases:
            phase_heal(f, args)
        if "restart" in phases:
            phase_restart(f, args)
        f.stop_sampling.set()
        sampler.join()
        last = f.samples[-1][2] if f.samples else []
        rss = [r / 1024 for _, r, _, _ in last]
        hwm = [h / 1024 for row in f.samples for _, _, h, _ in row[2]]
        rates = f.rates()
        out("rss_median_mib", f"{statistics.median(rss):.1f}" if rss else "nan")
        out("rss_max_mib", f"{max(rss):.1f}" if rss else "nan")
        out("rss_peak_mib", f"{max(hwm):.1f}" if hwm else "nan")
        if rates:
            r, phase, i = max(rates)
            out("bytes_per_node_s_median", f"{statistics.median([x for x, _, _ in rates]):.0f}")
            out("bytes_per_node_s_peak", f"{r:.0f}")
            out("bytes_per_node_s_peak_at", f"{phase}/n{i}")
    finally:
        f.stop_sampling.set()
        f.cleanup()


if __name__ == "__main__":
    main()
