#!/usr/bin/env bash
# Local answers over UDP (SPEC §9): the same 1 000 names served by the echo
# floor, NSD, Knot, unbound, dnsmasq and Glued, one at a time, each pinned to
# CPU 0 with one serving thread, dnsperf pinned to CPU 1. Two passes per
# server: saturated (no rate limit) and at a fixed offered rate (90 % of what
# NSD answered saturated, or $RATE). Prints qps, lost, latency and the
# server's CPU µs per answered query, then the ratios Glued/NSD and
# Glued/echo.
#
# Usage: bench/dns.sh            (as root on a fresh Debian 12; a few minutes)
# Knobs: DURATION=10 RATE=<qps> SERVERS="nsd echo knot unbound dnsmasq glued"
#        SKIP_INSTALL=1 SKIP_BUILD=1 KEEP_WORK=1 (see bench/lib.sh)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SERVERS="${SERVERS:-nsd echo knot unbound dnsmasq glued}"
RATE="${RATE:-}"

install_packages
build_echo
case " $SERVERS " in *" glued "*) build_glued ;; esac

QUERIES="$WORK/queries.txt"
write_queries "$QUERIES" "$DOMAIN" host "$ZONE_NAMES"

# NSD first: its saturated throughput sets the fixed rate of the second pass.
ordered="nsd"
for s in $SERVERS; do [ "$s" != nsd ] && ordered="$ordered $s"; done
case " $SERVERS " in *" nsd "*) ;; *) ordered="${ordered#nsd }" ;; esac

declare -A SAT FIXED
n=0
for server in $ordered; do
    n=$((n + 1))
    port=$((BASE_PORT + n))
    log "$server on 127.0.0.1:$port (CPU $SERVER_CPU)"
    "start_$server" "$server" "$port" "$SERVER_CPU"
    pid=$SERVER_PID
    if ! wait_dns "$port" "host1.$DOMAIN"; then
        echo "  $server does not answer on port $port; log:" >&2
        tail -5 "$WORK/$server.log" >&2 || true
        stop_server "$pid"
        continue
    fi
    if [ "$server" != echo ] && ! check_answers "$port" "host1.$DOMAIN" "$(host_ip 1)" "nx-check.$DOMAIN"; then
        echo "  $server answers wrongly: not measured" >&2
        stop_server "$pid"
        continue
    fi
    # Warm-up (not measured): fills caches, faults pages in, starts threads.
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$QUERIES" -l 1 \
        -c "$CLIENTS" -q "$OUTSTANDING" > /dev/null 2>&1 || true
    log "$server: saturated, ${DURATION}s"
    SAT[$server]="$(measure "$pid" "$port" "$QUERIES" "$server-sat" 0)"
    if [ -z "$RATE" ]; then
        if [ "$server" = nsd ]; then
            RATE="$(awk '{ printf "%d", $1 * 0.9 }' <<<"${SAT[nsd]}")"
        else
            RATE=50000
        fi
        log "fixed rate for the second pass: $RATE qps"
    fi
    log "$server: at $RATE qps, ${DURATION}s"
    FIXED[$server]="$(measure "$pid" "$port" "$QUERIES" "$server-fixed" "$RATE")"
    stop_server "$pid"
done

load_note
echo
describe_machine
echo "zone: $ZONE_NAMES names under $DOMAIN; queries: 90 % existing (A), 10 % NXDOMAIN, shuffled"
echo
echo "Pass 1: saturated (dnsperf sends as fast as answers come back, -q $OUTSTANDING in flight)"
print_header
for s in $ordered; do [ -n "${SAT[$s]:-}" ] && print_row "$s" "${SAT[$s]}"; done
echo
echo "Pass 2: fixed offered rate, -Q $RATE"
print_header
for s in $ordered; do [ -n "${FIXED[$s]:-}" ] && print_row "$s" "${FIXED[$s]}"; done
print_noise_legend
echo

us() { awk '{ print $6 }' <<<"${1:-}"; }
for pass in SAT FIXED; do
    declare -n P=$pass
    g="$(us "${P[glued]:-}")"; nsd="$(us "${P[nsd]:-}")"; e="$(us "${P[echo]:-}")"
    name=$([ "$pass" = SAT ] && echo saturated || echo "fixed rate")
    echo "CPU µs/query ratios ($name): Glued/NSD = $(ratio "$g" "$nsd") (target ≤ 1.00)," \
        "Glued/echo = $(ratio "$g" "$e") (target ≤ 1.15)"
    unset -n P
done
if [ -n "${FIXED[glued]:-}" ]; then
    echo "Glued lost at $RATE qps: $(awk '{ print $3 }' <<<"${FIXED[glued]}") (target 0)"
fi
