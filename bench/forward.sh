#!/usr/bin/env bash
# Forwarding (SPEC §9): Glued and dnsmasq each forward the same queries —
# names outside their own zone — to the same upstream, an NSD serving those
# names on another port. The forwarder under test is pinned to CPU 0; dnsperf
# and the upstream NSD share CPU 1, so CPU 0 holds only the forwarder. Both
# run without a cache (dnsmasq cache-size=0, GLUED_CACHE_SIZE=0) so that every
# query really is forwarded; each query leaves Glued from a port drawn at
# random from its pool (RFC 5452), as dnsmasq's leave from random ports.
# Identical queries in flight are merged by both. Two passes per forwarder:
# saturated and at a fixed offered rate
# (90 % of what dnsmasq answered saturated, or $RATE). Prints qps, lost,
# latency and the forwarder's CPU µs per answered query, and the ratio
# Glued/dnsmasq.
#
# Usage: bench/forward.sh        (as root on a fresh Debian 12; a few minutes)
# Knobs: DURATION=10 RATE=<qps> FORWARDERS="dnsmasq glued"
#        GLUED_BASE_BIN=<path>: adds a "glued-base" row, another Glued binary
#        (e.g. built from an older commit) measured side by side
#        SKIP_INSTALL=1 SKIP_BUILD=1 KEEP_WORK=1 (see bench/lib.sh)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GLUED_BASE_BIN="${GLUED_BASE_BIN:-}"
FORWARDERS="${FORWARDERS:-dnsmasq glued${GLUED_BASE_BIN:+ glued-base}}"
RATE="${RATE:-}"
UPSTREAM_DOMAIN="${UPSTREAM_DOMAIN:-upstream.test}"
UPSTREAM_PORT=$((BASE_PORT + 50))
# Every query really forwarded: Glued's cache off (bench/cache.sh measures it).
CACHE_SIZE=0

install_packages
case " $FORWARDERS " in *" glued "*) build_glued ;; esac

QUERIES="$WORK/queries.txt"
write_queries "$QUERIES" "$UPSTREAM_DOMAIN" svc "$ZONE_NAMES"

# The upstream: NSD with the svc* names, on the client CPU.
ZONE_DOMAIN="$UPSTREAM_DOMAIN" ZONE_PREFIX=svc
log "upstream nsd on 127.0.0.1:$UPSTREAM_PORT (CPU $CLIENT_CPU)"
start_nsd upstream "$UPSTREAM_PORT" "$CLIENT_CPU"
UPSTREAM_PID=$SERVER_PID
wait_dns "$UPSTREAM_PORT" "svc1.$UPSTREAM_DOMAIN" || die "upstream NSD does not answer"
check_answers "$UPSTREAM_PORT" "svc1.$UPSTREAM_DOMAIN" "$(host_ip 1)" "nx-check.$UPSTREAM_DOMAIN" \
    || die "upstream NSD answers wrongly"

# The forwarders' own zone is glued.internal: none of the queries is in it.
ZONE_DOMAIN="$DOMAIN" ZONE_PREFIX=host

declare -A SAT FIXED
# Reference row: dnsperf straight at the upstream (its CPU is NSD's).
log "upstream direct: saturated, ${DURATION}s"
SAT[direct]="$(measure "$UPSTREAM_PID" "$UPSTREAM_PORT" "$QUERIES" direct-sat 0)"

n=0
for fwd in $FORWARDERS; do
    n=$((n + 1))
    port=$((BASE_PORT + 60 + n))
    log "$fwd on 127.0.0.1:$port (CPU $SERVER_CPU) forwarding to 127.0.0.1:$UPSTREAM_PORT"
    case "$fwd" in
        dnsmasq) start_dnsmasq dnsmasq "$port" "$SERVER_CPU" "127.0.0.1#$UPSTREAM_PORT" ;;
        glued) start_glued glued "$port" "$SERVER_CPU" "127.0.0.1:$UPSTREAM_PORT" ;;
        glued-base)
            [ -x "$GLUED_BASE_BIN" ] || die "GLUED_BASE_BIN=$GLUED_BASE_BIN is not an executable"
            GLUED_BIN="$GLUED_BASE_BIN" start_glued glued-base "$port" "$SERVER_CPU" "127.0.0.1:$UPSTREAM_PORT"
            ;;
        *) die "unknown forwarder $fwd" ;;
    esac
    pid=$SERVER_PID
    if ! wait_dns "$port" "svc1.$UPSTREAM_DOMAIN" \
        || ! check_answers "$port" "svc1.$UPSTREAM_DOMAIN" "$(host_ip 1)" "nx-check.$UPSTREAM_DOMAIN"; then
        echo "  $fwd does not forward correctly on port $port: not measured; log:" >&2
        tail -5 "$WORK/$fwd.log" >&2 || true
        stop_server "$pid"
        continue
    fi
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$QUERIES" -l 1 \
        -c "$CLIENTS" -q "$OUTSTANDING" > /dev/null 2>&1 || true
    log "$fwd: saturated, ${DURATION}s"
    SAT[$fwd]="$(measure "$pid" "$port" "$QUERIES" "$fwd-sat" 0)"
    if [ -z "$RATE" ]; then
        RATE="$(awk '{ printf "%d", $1 * 0.9 }' <<<"${SAT[$fwd]}")"
        [ "$RATE" -gt 0 ] || RATE=20000
        log "fixed rate for the second pass: $RATE qps"
    fi
    log "$fwd: at $RATE qps, ${DURATION}s"
    FIXED[$fwd]="$(measure "$pid" "$port" "$QUERIES" "$fwd-fixed" "$RATE")"
    stop_server "$pid"
done
stop_server "$UPSTREAM_PID"

load_note
echo
describe_machine
echo "upstream: NSD on CPU $CLIENT_CPU serving $ZONE_NAMES names under $UPSTREAM_DOMAIN;" \
    "queries: 90 % existing (A), 10 % NXDOMAIN, shuffled; dnsmasq cache-size=0, GLUED_CACHE_SIZE=0"
echo
echo "Pass 1: saturated (-q $OUTSTANDING in flight); 'direct' = dnsperf straight at the upstream"
print_header
for s in direct $FORWARDERS; do [ -n "${SAT[$s]:-}" ] && print_row "$s" "${SAT[$s]}"; done
echo
echo "Pass 2: fixed offered rate, -Q $RATE"
print_header
for s in $FORWARDERS; do [ -n "${FIXED[$s]:-}" ] && print_row "$s" "${FIXED[$s]}"; done
print_noise_legend
echo
us() { awk '{ print $6 }' <<<"${1:-}"; }
echo "Forwarding CPU µs/query, Glued/dnsmasq: saturated $(ratio "$(us "${SAT[glued]:-}")" "$(us "${SAT[dnsmasq]:-}")")," \
    "fixed rate $(ratio "$(us "${FIXED[glued]:-}")" "$(us "${FIXED[dnsmasq]:-}")") (target ≤ 1.00)"
if [ -n "${SAT[glued-base]:-}" ]; then
    echo "Glued/glued-base ($GLUED_BASE_BIN): saturated $(ratio "$(us "${SAT[glued]:-}")" "$(us "${SAT[glued-base]:-}")")," \
        "fixed rate $(ratio "$(us "${FIXED[glued]:-}")" "$(us "${FIXED[glued-base]:-}")")"
fi
