#!/usr/bin/env bash
# Local answers over UDP (SPEC §9): the same 1 000 names served by the echo
# floor, NSD, Knot, unbound, dnsmasq and Glued, one at a time, each pinned to
# CPU 0 with one serving thread, dnsperf pinned to CPU 1. Two passes per
# server: saturated (no rate limit) and at a fixed offered rate (90 % of what
# NSD answered saturated, or $RATE). Prints qps, lost, latency and the
# server's CPU µs per answered query, then the ratios Glued/NSD and
# Glued/echo.
#
# With --threads N: the echo floor (N SO_REUSEPORT processes), NSD
# (server-count N), Knot (udp-workers N) and Glued (dns_threads N), each
# pinned to CPUs 0..N-1, dnsperf with one thread per remaining CPU (all CPUs
# when none remain), measured as ../shared/bench-multicore/run.sh does:
# saturated only, dnsperf -T <client CPUs> -c 8×that -q 2000, a 1 s
# warm-up, server CPU time of the process tree per completed query.
#
# Usage: bench/dns.sh [--threads N]  (as root on a fresh Debian 12; a few minutes)
# Knobs: DURATION=10 RATE=<qps> SERVERS="nsd echo knot unbound dnsmasq glued"
#        SKIP_INSTALL=1 SKIP_BUILD=1 KEEP_WORK=1 (see bench/lib.sh)

MULTI=0
while [ $# -gt 0 ]; do
    case $1 in
        --threads) THREADS="${2:?--threads needs a number}"; MULTI=1; shift 2 ;;
        --threads=*) THREADS="${1#--threads=}"; MULTI=1; shift ;;
        *) echo "usage: $0 [--threads N]" >&2; exit 2 ;;
    esac
done
if [ "$MULTI" = 1 ]; then
    [[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "--threads: a number ≥ 1, not '$THREADS'" >&2; exit 2; }
    n_cpus="$(nproc)"
    SERVER_CPU="0-$((THREADS - 1))"
    if [ "$THREADS" -lt "$n_cpus" ]; then
        CLIENT_CPU="$THREADS-$((n_cpus - 1))"
        CLIENT_THREADS=$((n_cpus - THREADS))
    else
        CLIENT_CPU="0-$((n_cpus - 1))"
        CLIENT_THREADS=1
        echo "NOTE: $THREADS serving threads on $n_cpus CPUs: dnsperf shares the servers' CPUs" >&2
    fi
    CLIENTS=$((CLIENT_THREADS * 8))
    OUTSTANDING=2000
    DURATION="${DURATION:-5}"
    SERVERS="${SERVERS:-nsd echo knot glued}"
fi
export THREADS

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
        -c "$CLIENTS" -T "$CLIENT_THREADS" -q "$OUTSTANDING" > /dev/null 2>&1 || true
    log "$server: saturated, ${DURATION}s"
    SAT[$server]="$(measure "$pid" "$port" "$QUERIES" "$server-sat" 0)"
    if [ "$MULTI" = 1 ]; then
        stop_server "$pid"
        continue
    fi
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
if [ "$MULTI" = 0 ]; then
    echo
    echo "Pass 2: fixed offered rate, -Q $RATE"
    print_header
    for s in $ordered; do [ -n "${FIXED[$s]:-}" ] && print_row "$s" "${FIXED[$s]}"; done
fi
print_noise_legend
echo

us() { awk '{ print $6 }' <<<"${1:-}"; }
echo_target=$([ "$THREADS" -gt 1 ] && echo 1.20 || echo 1.15)
passes=$([ "$MULTI" = 1 ] && echo SAT || echo "SAT FIXED")
for pass in $passes; do
    declare -n P=$pass
    g="$(us "${P[glued]:-}")"; nsd="$(us "${P[nsd]:-}")"; e="$(us "${P[echo]:-}")"
    k="$(us "${P[knot]:-}")"
    name=$([ "$pass" = SAT ] && echo saturated || echo "fixed rate")
    echo "CPU µs/query ratios ($name, $THREADS serving threads): Glued/NSD = $(ratio "$g" "$nsd") (target ≤ 1.00)," \
        "Glued/Knot = $(ratio "$g" "$k") (target ≤ 1.00)," \
        "Glued/echo = $(ratio "$g" "$e") (target ≤ $echo_target)"
    unset -n P
done
if [ -n "${FIXED[glued]:-}" ]; then
    echo "Glued lost at $RATE qps: $(awk '{ print $3 }' <<<"${FIXED[glued]}") (target 0)"
fi
