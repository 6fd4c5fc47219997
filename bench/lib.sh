# shellcheck shell=bash
# Shared helpers of bench/dns.sh and bench/forward.sh: installing the tools,
# building Glued and the echo floor, writing each server's configuration,
# starting a server pinned to one CPU, measuring its CPU time around one
# dnsperf run, and printing a table.
#
# Everything runs on loopback (127.0.0.1); every server is started by these
# scripts, measured, and stopped by its PID.

set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$BENCH_DIR/.." && pwd)"

# ---- knobs (environment overrides) -----------------------------------------
DURATION="${DURATION:-10}"          # seconds per dnsperf pass (-l)
SERVER_CPU="${SERVER_CPU:-0}"       # CPU(s) the server under test is pinned to (taskset list)
CLIENT_CPU="${CLIENT_CPU:-1}"       # CPU(s) dnsperf (and helper servers) run on
CLIENTS="${CLIENTS:-4}"             # dnsperf -c: sockets (source ports)
OUTSTANDING="${OUTSTANDING:-200}"   # dnsperf -q: queries in flight
CLIENT_THREADS="${CLIENT_THREADS:-1}" # dnsperf -T: client threads
THREADS="${THREADS:-1}"             # serving threads (processes for the echo floor)
QUERY_TIMEOUT="${QUERY_TIMEOUT:-2}" # dnsperf -t: a query unanswered this long is lost
ZONE_NAMES="${ZONE_NAMES:-1000}"    # names in the zone
QUERY_LINES="${QUERY_LINES:-20000}" # lines in the (looped) query file
DOMAIN="${DOMAIN:-glued.internal}"
BASE_PORT="${BASE_PORT:-25300}"     # servers listen on BASE_PORT+n
SKIP_INSTALL="${SKIP_INSTALL:-0}"   # 1: do not apt-get install
SKIP_BUILD="${SKIP_BUILD:-0}"       # 1: use the existing release binaries

CLK_TCK="$(getconf CLK_TCK)"
WORK="$(mktemp -d /tmp/glued-bench.XXXXXX)"
GLUED_BIN="$REPO_DIR/target/release/glued"
ECHO_BIN="$BENCH_DIR/echo/target/release/dns-echo"

# PIDs of the servers this script started; killed on exit.
STARTED_PIDS=()

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]:-}"; do
        [ -n "$pid" ] && kill_tree "$pid"
    done
    if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---- installation ------------------------------------------------------------

# Installs the Debian packages the benchmarks need. Package services are not
# started by the install (policy-rc.d), so nothing else listens on port 53.
install_packages() {
    [ "$SKIP_INSTALL" = 1 ] && return 0
    local need=() pkg bin
    for pkg in dnsperf:dnsperf nsd:nsd knot:knotd unbound:unbound dnsmasq:dnsmasq \
               util-linux:taskset procps:ps dnsutils:dig build-essential:cc; do
        bin="${pkg#*:}"; pkg="${pkg%%:*}"
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
    done
    [ "${#need[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need[*]} (or install them first)"
    log "installing ${need[*]}"
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
}

build_glued() {
    if [ "$SKIP_BUILD" != 1 ]; then
        ensure_cargo
        log "building glued (release)"
        (cd "$REPO_DIR" && cargo build --release --quiet --bin glued)
    fi
    [ -x "$GLUED_BIN" ] || die "$GLUED_BIN missing"
}

build_echo() {
    if [ "$SKIP_BUILD" != 1 ]; then
        ensure_cargo
        log "building the echo floor (release)"
        (cd "$BENCH_DIR/echo" && cargo build --release --quiet)
    fi
    [ -x "$ECHO_BIN" ] || die "$ECHO_BIN missing"
}

# ---- names -------------------------------------------------------------------

# Address of host number $1: 10.1.(n/250).(n%250+1).
host_ip() { echo "10.1.$(($1 / 250)).$(($1 % 250 + 1))"; }

# Writes a dnsperf query file: 90 % existing names (A), 10 % names that do not
# exist (NXDOMAIN), shuffled with a fixed seed.
#   $1 file  $2 domain  $3 name prefix  $4 number of existing names
write_queries() {
    local file=$1 domain=$2 prefix=$3 names=$4
    awk -v n="$QUERY_LINES" -v names="$names" -v d="$domain" -v p="$prefix" 'BEGIN {
        srand(20240601);
        for (i = 0; i < n; i++) {
            if (i % 10 == 9) printf "nx%d-%s.%s A\n", i, p, d;
            else printf "%s%d.%s A\n", p, int(rand() * names), d;
        }
    }' | awk 'BEGIN { srand(7) } { print rand() "\t" $0 }' | sort -k1,1 | cut -f2- > "$file"
}

# Writes an RFC 1035 zone file for $2 with hosts $3 0..$4-1.
write_zone_file() {
    local file=$1 domain=$2 prefix=$3 names=$4 i
    {
        echo "\$ORIGIN $domain."
        echo "\$TTL ${ZONE_TTL:-5}"
        echo "@ IN SOA ns.$domain. hostmaster.$domain. 1 3600 600 86400 5"
        echo "@ IN NS ns.$domain."
        echo "ns IN A 127.0.0.1"
        for ((i = 0; i < names; i++)); do echo "$prefix$i IN A $(host_ip "$i")"; done
    } > "$file"
}

# ---- process CPU ---------------------------------------------------------------

# All PIDs of the tree rooted at $1 (the process and its descendants).
tree_pids() {
    local pid=$1 child
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do tree_pids "$child"; done
}

# utime+stime (clock ticks) of the tree rooted at $1, all threads included.
tree_ticks() {
    local total=0 pid stat
    for pid in $(tree_pids "$1"); do
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
        # Fields after the ")" of comm: state is field 3, utime 14, stime 15.
        stat="${stat##*) }"
        # shellcheck disable=SC2086 # split into fields on purpose
        set -- $stat
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

# The CPUs of a taskset list ("0", "0-3", "0,2-3"), one per line.
cpu_list() {
    local part
    for part in ${1//,/ }; do
        if [[ "$part" == *-* ]]; then seq "${part%-*}" "${part#*-}"; else echo "$part"; fi
    done
}

# Busy (non-idle, non-iowait) ticks of the CPUs $1 (a taskset list) from
# /proc/stat: everything that ran there, including soft interrupts not
# charged to any process.
cpu_busy_ticks() {
    awk -v cpus=" $(cpu_list "$1" | tr '\n' ' ')" '
        $1 ~ /^cpu[0-9]+$/ && index(cpus, " " substr($1, 4) " ") { t += $2 + $3 + $4 + $7 + $8 + $9 }
        END { print t + 0 }' /proc/stat
}

kill_tree() {
    local pid=$1 p
    local pids
    pids="$(tree_pids "$pid" 2>/dev/null || true)"
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
    wait "$pid" 2>/dev/null || true
}

# ---- servers -------------------------------------------------------------------

# Waits until a DNS server answers on 127.0.0.1:$1 (any rcode), up to 10 s.
wait_dns() {
    local port=$1 name=$2
    for _ in $(seq 1 100); do
        if dig +tries=1 +time=1 +short -p "$port" @127.0.0.1 "$name" A >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Starts "$@" pinned to CPU $1 with its output in $WORK/$2.log; sets SERVER_PID.
#   $1 cpu  $2 label  $3.. command
start_pinned() {
    local cpu=$1 label=$2
    shift 2
    taskset -c "$cpu" "$@" > "$WORK/$label.log" 2>&1 &
    SERVER_PID=$!
    STARTED_PIDS+=("$SERVER_PID")
}

stop_server() {
    local pid=$1 i
    kill_tree "$pid"
    for i in "${!STARTED_PIDS[@]}"; do
        [ "${STARTED_PIDS[$i]}" = "$pid" ] && unset 'STARTED_PIDS[i]'
    done
    return 0
}

# Checks that the server on $1 answers an existing name with its address and a
# missing one with NXDOMAIN; prints what it got otherwise (and fails).
#   $1 port  $2 existing name  $3 expected address  $4 missing name
check_answers() {
    local port=$1 name=$2 ip=$3 missing=$4 got
    got="$(dig +tries=2 +time=1 +short -p "$port" @127.0.0.1 "$name" A 2>&1 || true)"
    if ! grep -qx "$ip" <<<"$got"; then
        echo "  $name -> '$got' (expected $ip)" >&2
        return 1
    fi
    got="$(dig +tries=2 +time=1 -p "$port" @127.0.0.1 "$missing" A 2>&1 | grep -o 'status: [A-Z]*' || true)"
    if [ "$got" != "status: NXDOMAIN" ]; then
        echo "  $missing -> '$got' (expected NXDOMAIN)" >&2
        return 1
    fi
}

# ---- one measured dnsperf pass ------------------------------------------------

# Runs dnsperf (pinned to CLIENT_CPU) against 127.0.0.1:$2 while measuring the
# CPU time of the process tree $1 and of SERVER_CPU. Prints one result line:
#   qps completed lost avg_ms max_ms server_us_per_q cpu0_us_per_q resp_bytes nx_pct
#   $1 server pid  $2 port  $3 query file  $4 label  $5 max qps (0 = unlimited)
measure() {
    local pid=$1 port=$2 queries=$3 label=$4 rate=$5
    local out="$WORK/dnsperf-$label.txt"
    local extra=()
    [ "$rate" != 0 ] && extra=(-Q "$rate")
    local t0 c0 t1 c1
    t0="$(tree_ticks "$pid")"
    c0="$(cpu_busy_ticks "$SERVER_CPU")"
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$queries" \
        -l "$DURATION" -c "$CLIENTS" -T "$CLIENT_THREADS" -q "$OUTSTANDING" -t "$QUERY_TIMEOUT" \
        "${extra[@]}" > "$out" 2>&1 || true
    t1="$(tree_ticks "$pid")"
    c1="$(cpu_busy_ticks "$SERVER_CPU")"
    kill -0 "$pid" 2>/dev/null || { echo "  server $label died; log:" >&2; tail -5 "$WORK/${label%%-*}.log" >&2; }
    awk -v t="$((t1 - t0))" -v c="$((c1 - c0))" -v hz="$CLK_TCK" '
        /Queries completed:/ { done = $3 }
        /Queries lost:/ { lost = $3 }
        /Queries per second:/ { qps = $4 }
        /Average packet size:/ { resp = $7 }
        /Response codes:/ { nx = "0"; if (match($0, /NXDOMAIN [0-9]+ \([0-9.]+%/)) { nx = substr($0, RSTART, RLENGTH); sub(/.*\(/, "", nx); sub(/%/, "", nx) } }
        /Average Latency/ {
            avg = $4
            max = $0; sub(/.*max /, "", max); sub(/\).*/, "", max)
        }
        END {
            if (done == "") { print "0 0 0 0 0 0 0 0 0"; exit }
            us = done > 0 ? t * 1e6 / hz / done : 0
            c0 = done > 0 ? c * 1e6 / hz / done : 0
            printf "%d %d %d %.3f %.3f %.2f %.2f %d %.1f\n", qps, done, lost, avg * 1000, max * 1000, us, c0, resp, nx
        }' "$out"
}

# ---- table ---------------------------------------------------------------------

ROW_FMT='%-10s %8s %9s %6s %7s %8s %9s %10s %7s %6s\n'

print_header() {
    # shellcheck disable=SC2059
    printf "$ROW_FMT" "server" "qps" "answered" "lost" "avg ms" "max ms" "us/query" "cpu0 us/q" "resp B" "NX %"
    # shellcheck disable=SC2059
    printf "$ROW_FMT" "------" "---" "--------" "----" "------" "------" "--------" "---------" "------" "----"
}

# $1 label, then the 9 fields printed by measure().
print_row() {
    local label=$1
    shift
    # shellcheck disable=SC2048,SC2086 # split the fields on purpose
    set -- $*
    local mark=""
    # CPU 0 much busier than the server: something else ran there.
    if awk -v s="$6" -v c="$7" 'BEGIN { exit !(c > s * 1.25 + 0.3) }'; then
        mark=" *"
        NOISY_ROWS=1
    fi
    # shellcheck disable=SC2059
    printf "${ROW_FMT%\\n}%s\n" "$label" "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "$mark"
}

NOISY_ROWS=0

# Explains the "*" of print_row, if any row had one.
print_noise_legend() {
    if [ "$NOISY_ROWS" = 1 ]; then
        echo "* CPU $SERVER_CPU was more than 25 % busier than the server during that pass:" \
            "another process ran there, the row is noisy (not meaningful for rows whose" \
            "server is not on CPU $SERVER_CPU)."
    fi
    return 0
}

# Ratio a/b with two decimals, or "n/a".
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a > 0) printf "%.2f", a / b; else printf "n/a" }'
}

# Warns when something else is eating the machine (e.g. a compile). ps's %CPU
# is averaged over each process's life: a hint only; the "*" rows are the
# per-pass measure.
load_note() {
    local busy
    busy="$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 > 20 && $2 !~ /^(dnsperf|nsd|knotd|unbound|dnsmasq|glued|dns-echo|ps|awk)/ { print $2 "(" $1 "%)" }' | head -5 | tr '\n' ' ')"
    if [ -n "$busy" ]; then
        echo "NOTE: other busy processes during the run: $busy— figures are noisy." >&2
    fi
}

describe_machine() {
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "dnsperf: -l $DURATION -c $CLIENTS -T $CLIENT_THREADS -q $OUTSTANDING -t $QUERY_TIMEOUT, pinned to CPU $CLIENT_CPU; servers ($THREADS serving threads) pinned to CPU $SERVER_CPU"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# ---- per-server configuration and start -----------------------------------------
# Each start_* takes: $1 label  $2 port  $3 cpu, writes its configuration under
# $WORK/$label/, starts the server in the foreground (pinned) and sets
# SERVER_PID. Zone contents come from ZONE_DOMAIN / ZONE_PREFIX / ZONE_COUNT.

ZONE_DOMAIN="$DOMAIN"
ZONE_PREFIX="host"
ZONE_COUNT="$ZONE_NAMES"

# NSD: $THREADS server processes (SO_REUSEPORT), response rate limiting off.
start_nsd() {
    local label=$1 port=$2 cpu=$3 dir="$WORK/$1"
    mkdir -p "$dir"
    write_zone_file "$dir/zone" "$ZONE_DOMAIN" "$ZONE_PREFIX" "$ZONE_COUNT"
    cat > "$dir/nsd.conf" <<CONF
server:
    server-count: $THREADS
    reuseport: $([ "$THREADS" -gt 1 ] && echo yes || echo no)
    ip-address: 127.0.0.1@$port
    port: $port
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "$dir"
    database: ""
    zonelistfile: "$dir/zone.list"
    xfrdfile: "$dir/xfrd.state"
    xfrdir: "$dir"
    pidfile: "$dir/nsd.pid"
    logfile: "$dir/nsd.log"
    verbosity: 0
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: "$ZONE_DOMAIN"
    zonefile: "$dir/zone"
CONF
    start_pinned "$cpu" "$label" nsd -d -c "$dir/nsd.conf"
}

# Knot DNS: $THREADS UDP workers, one TCP and one background worker.
start_knot() {
    local label=$1 port=$2 cpu=$3 dir="$WORK/$1"
    mkdir -p "$dir/db"
    write_zone_file "$dir/zone" "$ZONE_DOMAIN" "$ZONE_PREFIX" "$ZONE_COUNT"
    cat > "$dir/knot.conf" <<CONF
server:
    rundir: "$dir"
    user: root:root
    listen: 127.0.0.1@$port
    udp-workers: $THREADS
    tcp-workers: 1
    background-workers: 1
control:
    listen: "$dir/knot.sock"
database:
    storage: "$dir/db"
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: "$dir"
    zonefile-sync: -1
    journal-content: none
zone:
  - domain: $ZONE_DOMAIN
    file: "$dir/zone"
CONF
    start_pinned "$cpu" "$label" knotd -c "$dir/knot.conf"
}

# unbound: the names as local-data of a static local zone, $THREADS threads.
start_unbound() {
    local label=$1 port=$2 cpu=$3 dir="$WORK/$1" i
    mkdir -p "$dir"
    {
        cat <<CONF
server:
    interface: 127.0.0.1
    port: $port
    num-threads: $THREADS
    do-daemonize: no
    do-ip6: no
    username: ""
    chroot: ""
    directory: "$dir"
    pidfile: "$dir/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    access-control: 127.0.0.0/8 allow
    so-reuseport: $([ "$THREADS" -gt 1 ] && echo yes || echo no)
    local-zone: "$ZONE_DOMAIN." static
    local-data: "$ZONE_DOMAIN. 5 IN SOA ns.$ZONE_DOMAIN. hostmaster.$ZONE_DOMAIN. 1 3600 600 86400 5"
    local-data: "$ZONE_DOMAIN. 5 IN NS ns.$ZONE_DOMAIN."
    local-data: "ns.$ZONE_DOMAIN. 5 IN A 127.0.0.1"
CONF
        for ((i = 0; i < ZONE_COUNT; i++)); do
            echo "    local-data: \"$ZONE_PREFIX$i.$ZONE_DOMAIN. 5 IN A $(host_ip "$i")\""
        done
        echo "remote-control:"
        echo "    control-enable: no"
    } > "$dir/unbound.conf"
    start_pinned "$cpu" "$label" unbound -d -c "$dir/unbound.conf"
}

# dnsmasq: host-record entries, NXDOMAIN for the rest of the domain
# (local=/domain/), no upstreams unless $4 names one (ip#port); no cache when
# forwarding so that every query really is forwarded, unless $5 sets a cache
# size.
start_dnsmasq() {
    local label=$1 port=$2 cpu=$3 upstream=${4:-} cache_size=${5:-0} dir="$WORK/$1" i
    mkdir -p "$dir"
    {
        echo "port=$port"
        echo "listen-address=127.0.0.1"
        echo "bind-interfaces"
        echo "no-resolv"
        echo "no-hosts"
        echo "no-poll"
        echo "user=root"
        echo "pid-file="
        echo "log-facility=$dir/dnsmasq.log"
        echo "local-ttl=5"
        echo "local=/$ZONE_DOMAIN/"
        if [ -n "$upstream" ]; then
            echo "server=$upstream"
            echo "cache-size=$cache_size"
            echo "dns-forward-max=1000"
        fi
        for ((i = 0; i < ZONE_COUNT; i++)); do
            echo "host-record=$ZONE_PREFIX$i.$ZONE_DOMAIN,$(host_ip "$i")"
        done
    } > "$dir/dnsmasq.conf"
    start_pinned "$cpu" "$label" dnsmasq -k -C "$dir/dnsmasq.conf"
}

# Glued: a generated glued.toml with the static records, $THREADS DNS threads, no
# mDNS, gossip on 127.0.0.1:0, a network that does not exist. $4 (ip:port)
# sets the upstream; CACHE_SIZE (default 10000) its forward cache.
start_glued() {
    local label=$1 port=$2 cpu=$3 upstream=${4:-127.0.0.1:9} dir="$WORK/$1" i
    mkdir -p "$dir/data"
    {
        echo "dns_bind = \"127.0.0.1:$port\""
        echo "dns_threads = $THREADS"
        echo "http_bind = \"127.0.0.1:0\""
        echo "domain = \"$ZONE_DOMAIN\""
        echo "node_name = \"bench\""
        echo "upstreams = \"$upstream\""
        echo "data_dir = \"$dir/data\""
        echo "gossip_bind = \"127.0.0.1:0\""
        echo "mdns = false"
        echo "network_name = \"glued-bench-no-such-network\""
        echo "log = \"warn\""
        for ((i = 0; i < ZONE_COUNT; i++)); do
            printf '\n[[records]]\nname = "%s%d"\nip = "%s"\n' "$ZONE_PREFIX" "$i" "$(host_ip "$i")"
        done
    } > "$dir/glued.toml"
    # The environment repeats the essentials (it wins over the file, SPEC §8),
    # so a run is the same whatever ./glued.toml or GLUED_* the caller has.
    start_pinned "$cpu" "$label" env \
        GLUED_DNS_BIND="127.0.0.1:$port" GLUED_DNS_THREADS="$THREADS" GLUED_MDNS=false \
        GLUED_GOSSIP_BIND=127.0.0.1:0 GLUED_HTTP_BIND=127.0.0.1:0 \
        GLUED_DATA_DIR="$dir/data" GLUED_NETWORK_NAME=glued-bench-no-such-network \
        GLUED_UPSTREAMS="$upstream" GLUED_DOMAIN="$ZONE_DOMAIN" RUST_LOG=warn \
        GLUED_CACHE_SIZE="${CACHE_SIZE:-10000}" \
        "$GLUED_BIN" run --config "$dir/glued.toml"
}

# The echo floor: answers every query with itself (QR set); $THREADS
# processes, each with its own SO_REUSEPORT socket.
start_echo() {
    local label=$1 port=$2 cpu=$3
    start_pinned "$cpu" "$label" "$ECHO_BIN" "127.0.0.1:$port" "$THREADS"
}
