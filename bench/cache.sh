#!/usr/bin/env bash
# The forward cache (SPEC §4 "Cache", §9; issue 13). An upstream NSD on CPU 1
# serves 1 000 names svc0 … svc999 under upstream.test with a TTL of one
# hour. Each server under test is pinned to CPU 0 with one serving thread and
# sent the same 1 000 names (type A, shuffled) by dnsperf on CPU 1, after one
# unmeasured warm-up pass that fills its cache, so every measured query is a
# cache hit:
#   echo           the recvmmsg echo floor
#   glued-local    Glued answering 1 000 names of its own zone (its local
#                  answer: the baseline of the cache target)
#   glued-cache    Glued forwarding upstream.test to the NSD, cache on
#   unbound-cache  unbound forwarding to the NSD (forward-zone, iterator only)
#   dnsmasq-cache  dnsmasq forwarding to the NSD, cache-size=10000
# Two passes each: saturated, then at a fixed rate (90 % of what unbound
# answered saturated, or $RATE): loss and latency at the rate unbound holds.
# Then a run with the upstream dead: Glued warmed on a 1 s TTL zone, the NSD
# killed, the entries expired; every answer is stale (TTL 30). Prints stale
# answers/s and CPU µs per stale answer.
#
# Usage: bench/cache.sh          (as root on a fresh Debian 12; a few minutes)
# Knobs: DURATION=10 RATE=<qps> SERVERS="echo glued-local glued-cache
#        unbound-cache dnsmasq-cache" STALE=1 (0: skip the dead-upstream run)
#        SKIP_INSTALL=1 SKIP_BUILD=1 KEEP_WORK=1 (see bench/lib.sh)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SERVERS="${SERVERS:-unbound-cache echo glued-local glued-cache dnsmasq-cache}"
RATE="${RATE:-}"
STALE="${STALE:-1}"
UPSTREAM_DOMAIN="${UPSTREAM_DOMAIN:-upstream.test}"
UPSTREAM_PORT=$((BASE_PORT + 70))
STALE_UPSTREAM_PORT=$((BASE_PORT + 71))

install_packages
build_echo
build_glued

# Only existing names: after the warm-up every query is a hit.
write_hits() {
    local file=$1 domain=$2 prefix=$3
    awk -v n="$QUERY_LINES" -v names="$ZONE_NAMES" -v d="$domain" -v p="$prefix" 'BEGIN {
        srand(20240601);
        for (i = 0; i < n; i++) printf "%s%d.%s A\n", p, int(rand() * names), d;
    }' > "$file"
}
UPSTREAM_QUERIES="$WORK/upstream-queries.txt"
LOCAL_QUERIES="$WORK/local-queries.txt"
write_hits "$UPSTREAM_QUERIES" "$UPSTREAM_DOMAIN" svc
write_hits "$LOCAL_QUERIES" "$DOMAIN" host

# unbound as a caching forwarder to 127.0.0.1@$4, one thread, no validator.
start_unbound_forwarder() {
    local label=$1 port=$2 cpu=$3 upstream_port=$4 dir="$WORK/$1"
    mkdir -p "$dir"
    cat > "$dir/unbound.conf" <<CONF
server:
    interface: 127.0.0.1
    port: $port
    num-threads: 1
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
    so-reuseport: no
    do-not-query-localhost: no
    module-config: "iterator"
    # test. is one of unbound's default local zones (RFC 6761): forward it.
    local-zone: "test." nodefault
    msg-cache-size: 16m
    rrset-cache-size: 32m
forward-zone:
    name: "$UPSTREAM_DOMAIN."
    forward-addr: 127.0.0.1@$upstream_port
remote-control:
    control-enable: no
CONF
    start_pinned "$cpu" "$label" unbound -d -c "$dir/unbound.conf"
}

# The upstream: NSD with the svc* names (TTL one hour), on the client CPU.
ZONE_DOMAIN="$UPSTREAM_DOMAIN" ZONE_PREFIX=svc ZONE_TTL=3600
log "upstream nsd on 127.0.0.1:$UPSTREAM_PORT (CPU $CLIENT_CPU)"
start_nsd upstream "$UPSTREAM_PORT" "$CLIENT_CPU"
UPSTREAM_PID=$SERVER_PID
wait_dns "$UPSTREAM_PORT" "svc1.$UPSTREAM_DOMAIN" || die "upstream NSD does not answer"
# Glued's own zone: glued.internal, host0 … host999.
ZONE_DOMAIN="$DOMAIN" ZONE_PREFIX=host ZONE_TTL=5

declare -A SAT FIXED
# unbound first: its saturated throughput sets the fixed rate.
ordered="unbound-cache"
for s in $SERVERS; do [ "$s" != unbound-cache ] && ordered="$ordered $s"; done
case " $SERVERS " in *" unbound-cache "*) ;; *) ordered="${ordered#unbound-cache }" ;; esac

n=0
for server in $ordered; do
    n=$((n + 1))
    port=$((BASE_PORT + 80 + n))
    queries="$UPSTREAM_QUERIES"
    probe="svc1.$UPSTREAM_DOMAIN"
    log "$server on 127.0.0.1:$port (CPU $SERVER_CPU)"
    case "$server" in
        echo) start_echo echo "$port" "$SERVER_CPU" ;;
        glued-local) start_glued "$server" "$port" "$SERVER_CPU"
            queries="$LOCAL_QUERIES"; probe="host1.$DOMAIN" ;;
        glued-cache) start_glued "$server" "$port" "$SERVER_CPU" "127.0.0.1:$UPSTREAM_PORT" ;;
        unbound-cache) start_unbound_forwarder "$server" "$port" "$SERVER_CPU" "$UPSTREAM_PORT" ;;
        dnsmasq-cache) start_dnsmasq "$server" "$port" "$SERVER_CPU" "127.0.0.1#$UPSTREAM_PORT" 10000 ;;
        *) die "unknown server $server" ;;
    esac
    pid=$SERVER_PID
    if ! wait_dns "$port" "$probe"; then
        echo "  $server does not answer on port $port; log:" >&2
        tail -5 "$WORK/$server.log" >&2 || true
        stop_server "$pid"
        continue
    fi
    if [ "$server" != echo ]; then
        got="$(dig +tries=2 +time=1 +short -p "$port" @127.0.0.1 "$probe" A || true)"
        if [ "$got" != "$(host_ip 1)" ]; then
            echo "  $server answers '$got' for $probe: not measured" >&2
            stop_server "$pid"
            continue
        fi
    fi
    # Warm-up (not measured): every name asked at least once, so the
    # measured passes are all cache hits.
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$queries" -l 2 \
        -c "$CLIENTS" -q "$OUTSTANDING" > /dev/null 2>&1 || true
    log "$server: saturated, ${DURATION}s"
    SAT[$server]="$(measure "$pid" "$port" "$queries" "$server-sat" 0)"
    if [ -z "$RATE" ]; then
        RATE="$(awk '{ printf "%d", $1 * 0.9 }' <<<"${SAT[$server]}")"
        [ "$RATE" -gt 0 ] || RATE=50000
        log "fixed rate for the second pass: $RATE qps"
    fi
    log "$server: at $RATE qps, ${DURATION}s"
    FIXED[$server]="$(measure "$pid" "$port" "$queries" "$server-fixed" "$RATE")"
    stop_server "$pid"
done
stop_server "$UPSTREAM_PID"

# The dead upstream: Glued warmed from an NSD whose TTL is 1 s; the NSD is
# killed and the entries expire; the first query of each name waits for the
# failure (then the stale answer), the next are stale answers from the
# serving thread.
STALE_ROW=""
if [ "$STALE" = 1 ]; then
    ZONE_DOMAIN="$UPSTREAM_DOMAIN" ZONE_PREFIX=svc ZONE_TTL=1
    start_nsd stale-upstream "$STALE_UPSTREAM_PORT" "$CLIENT_CPU"
    STALE_UPSTREAM_PID=$SERVER_PID
    wait_dns "$STALE_UPSTREAM_PORT" "svc1.$UPSTREAM_DOMAIN" || die "stale upstream NSD does not answer"
    ZONE_DOMAIN="$DOMAIN" ZONE_PREFIX=host ZONE_TTL=5
    port=$((BASE_PORT + 90))
    log "glued-stale on 127.0.0.1:$port, upstream 127.0.0.1:$STALE_UPSTREAM_PORT"
    start_glued glued-stale "$port" "$SERVER_CPU" "127.0.0.1:$STALE_UPSTREAM_PORT"
    pid=$SERVER_PID
    wait_dns "$port" "svc1.$UPSTREAM_DOMAIN" || die "glued-stale does not answer"
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$UPSTREAM_QUERIES" -l 1 \
        -c "$CLIENTS" -q "$OUTSTANDING" > /dev/null 2>&1 || true
    stop_server "$STALE_UPSTREAM_PID"
    sleep 2
    log "glued-stale: upstream dead, warm-up of the stale answers (4 s)"
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$UPSTREAM_QUERIES" -l 4 \
        -c "$CLIENTS" -q "$OUTSTANDING" -t 3 > /dev/null 2>&1 || true
    got="$(dig +tries=1 +time=3 -p "$port" @127.0.0.1 "svc1.$UPSTREAM_DOMAIN" A | grep -E '^svc1' || true)"
    log "glued-stale answers: $got"
    log "glued-stale: saturated, ${DURATION}s"
    STALE_ROW="$(measure "$pid" "$port" "$UPSTREAM_QUERIES" glued-stale-sat 0)"
    stop_server "$pid"
fi

load_note
echo
describe_machine
echo "upstream: NSD on CPU $CLIENT_CPU, $ZONE_NAMES names under $UPSTREAM_DOMAIN, TTL 3600;" \
    "queries: the $ZONE_NAMES names (A), shuffled, after a 2 s warm-up: all cache hits"
echo "glued-local: Glued answering its own $ZONE_NAMES names (the baseline of the cache)"
echo
echo "Pass 1: saturated (-q $OUTSTANDING in flight)"
print_header
for s in $ordered; do [ -n "${SAT[$s]:-}" ] && print_row "$s" "${SAT[$s]}"; done
echo
echo "Pass 2: fixed offered rate, -Q $RATE (90 % of unbound's saturated rate)"
print_header
for s in $ordered; do [ -n "${FIXED[$s]:-}" ] && print_row "$s" "${FIXED[$s]}"; done
if [ -n "$STALE_ROW" ]; then
    echo
    echo "Upstream dead, entries expired: every answer stale (TTL 30), saturated"
    print_header
    print_row glued-stale "$STALE_ROW"
    echo "last answer seen: $got"
fi
print_noise_legend
echo
us() { awk '{ print $6 }' <<<"${1:-}"; }
for pass in SAT FIXED; do
    declare -n P=$pass
    name=$([ "$pass" = SAT ] && echo saturated || echo "fixed rate")
    g="$(us "${P[glued-cache]:-}")"
    echo "CPU µs/query ($name): glued-cache/glued-local = $(ratio "$g" "$(us "${P[glued-local]:-}")") (target ≤ 1.10)," \
        "/unbound = $(ratio "$g" "$(us "${P[unbound-cache]:-}")"), /dnsmasq = $(ratio "$g" "$(us "${P[dnsmasq-cache]:-}")") (targets < 1.00)," \
        "/echo = $(ratio "$g" "$(us "${P[echo]:-}")")"
    unset -n P
done
if [ -n "${FIXED[glued-cache]:-}" ]; then
    echo "glued-cache lost at $RATE qps: $(awk '{ print $3 }' <<<"${FIXED[glued-cache]}") (target 0)"
fi
if [ -n "$STALE_ROW" ]; then
    echo "stale answers/s: $(awk '{ print $1 }' <<<"$STALE_ROW"), CPU µs per stale answer: $(us "$STALE_ROW")"
fi
