#!/usr/bin/env bash
# Cluster benchmarks of Glued (SPEC §9, issue 4): Glued processes on loopback
# (own ports, own data dirs, one secret, mDNS off), B, C and D bootstrapped to
# A's ID@127.0.0.1:port.
#
#  (a) record added on A -> answered by B (and C): only A watches a Docker
#      network created here; records are added at runtime by
#      `docker network connect` of a pool of running containers (parked on a
#      second, unwatched network) and removed by `disconnect`. Glued has no
#      other runtime path to add a record (static records are read at start
#      only). For each of CHANGES changes: time from just before the command
#      until A, B and C answer the name (DNS polled every ~1 ms), and the
#      gossip part alone (A answers -> B answers). Removals likewise.
#      Target: p99 < 250 ms.
#  (b) 10 000 records reaching a newly joined node: A is restarted with
#      RECORDS static [[records]] (same key, so the same id); once B holds
#      them, D is started bootstrapped to A; time from D's start until its
#      glued_records gauge equals A's, and until D answers the last name.
#      Target: < 2 s.
#  (c) resident memory: VmRSS of A (10 000 own records), D (10 000 remote)
#      and B before (a few records); then D under RSS_QPS queries/s of
#      dnsperf for RSS_SECS s after a 3 s warm-up: VmRSS before, every 5 s,
#      and after (no growth expected), next to C's (same records, no
#      queries) over the same time.
#
# Usage: bench/cluster.sh    (root, fresh Debian 12 with a running Docker engine)
# Knobs: CHANGES=200 POOL=8 RECORDS=10000 RSS_QPS=20000 RSS_SECS=30
#        SKIP_INSTALL=1 SKIP_BUILD=1 KEEP_WORK=1 GLUED_LOG=info

source "$(dirname "${BASH_SOURCE[0]}")/docker-lib.sh"

CHANGES="${CHANGES:-200}"
POOL="${POOL:-8}"
RECORDS="${RECORDS:-10000}"
RSS_QPS="${RSS_QPS:-20000}"
RSS_SECS="${RSS_SECS:-30}"
WARMUP_CHANGES=3

install_docker_bench_packages
ensure_image
build_glued

NET="gbench-$RUN_ID"
PARK="gbench-$RUN_ID-park"
NONE="gbench-$RUN_ID-absent" # watched by B, C, D: never created
create_network "$NET"
create_network "$PARK"
log "networks $NET (watched by A) and $PARK; pool of $POOL containers"
pool="$(start_pool "$PARK" "$RUN_ID-c" "$POOL")"

for label in a b c d; do write_node_config "$label" "${GLUED_LOG:-info}" 0; done
id_a="$(node_id 0 a)"
[[ "$id_a" =~ ^[0-9a-f]{64}$ ]] || die "glued id printed '$id_a'"
peer_a="$id_a@127.0.0.1:$(node_gossip_port 0)"
log "A is $id_a"

start_node 0 a 0-1 "$NET" ""
pid_a=$SERVER_PID
wait_node 0 a
start_node 1 b 0-1 "$NONE" "$peer_a"
pid_b=$SERVER_PID
start_node 2 c 0-1 "$NONE" "$peer_a"
pid_c=$SERVER_PID
wait_node 1 b
wait_node 2 c

# Waits until node $1 has at least $2 gossip neighbours (30 s).
wait_neighbors() {
    for _ in $(seq 1 300); do
        [ "$(metric "$1" glued_gossip_neighbors)" -ge "$2" ] && return 0
        sleep 0.1
    done
    echo "node $1: $(metric "$1" glued_gossip_neighbors) gossip neighbours after 30 s" >&2
    return 1
}
if ! { wait_neighbors 0 2 && wait_neighbors 1 1 && wait_neighbors 2 1; }; then
    die "the cluster did not form"
fi

probe_args=(--net "$NET" --pool "$pool" --domain "$DOMAIN" --labels "A,B,C"
    --dns "127.0.0.1:$(node_dns_port 0)" --dns "127.0.0.1:$(node_dns_port 1)"
    --dns "127.0.0.1:$(node_dns_port 2)")
log "(a) warm-up: $WARMUP_CHANGES changes"
run_child /dev/null python3 "$PROBE" connect-latency "${probe_args[@]}" --count "$WARMUP_CHANGES"
log "(a) $CHANGES changes on A (connect), each followed by its removal (disconnect)"
run_child "$WORK/result-a.txt" python3 "$PROBE" connect-latency "${probe_args[@]}" \
    --count "$CHANGES" --samples "$WORK/connect-latency.txt"
RESULT_A="$(cat "$WORK/result-a.txt")"
rss_b_small="$(rss_kib "$pid_b")"
records_b_small="$(metric 1 glued_records)"
gossip_drops_b="$(curl -s "http://127.0.0.1:$(node_http_port 1)/metrics" |
    awk '/^glued_gossip_dropped_total/ { s += $NF } END { print s + 0 }')"
pulls_b="$(metric 1 glued_gossip_state_pulls_total)"

# ---- (b) ------------------------------------------------------------------------
log "(b) restarting A with $RECORDS static records"
stop_server "$pid_a"
write_node_config a "${GLUED_LOG:-info}" "$RECORDS"
t_restart="$(date +%s%N)"
start_node 0 a 0-1 "$NET" ""
pid_a=$SERVER_PID
wait_node 0 a
run_child "$WORK/a-records.txt" python3 "$PROBE" wait-metric \
    --url "http://127.0.0.1:$(node_http_port 0)/metrics" --metric glued_records \
    --at-least "$RECORDS" --since-ns "$t_restart" --timeout 60 ||
    die "A does not hold its $RECORDS records: $(cat "$WORK/a-records.txt")"
records_a="$(metric 0 glued_records)"
B_AFTER_RESTART="$(python3 "$PROBE" wait-metric --url "http://127.0.0.1:$(node_http_port 1)/metrics" \
    --metric glued_records --at-least "$records_a" --since-ns "$t_restart" --timeout 60)" ||
    die "B never got A's $records_a records: $B_AFTER_RESTART"
python3 "$PROBE" wait-metric --url "http://127.0.0.1:$(node_http_port 2)/metrics" \
    --metric glued_records --at-least "$records_a" --since-ns "$t_restart" --timeout 60 > /dev/null ||
    die "C never got A's records"
sleep 1

log "(b) starting D, bootstrapped to A"
last="host$((RECORDS - 1)).$DOMAIN"
t_d="$(date +%s%N)"
start_node 3 d 0-1 "$NONE" "$peer_a"
pid_d=$SERVER_PID
python3 "$PROBE" wait-names --dns "127.0.0.1:$(node_dns_port 3)" --since-ns "$t_d" --timeout 60 \
    "$last" > "$WORK/d-names.txt" &
names_pid=$!
STARTED_PIDS+=("$names_pid")
run_child "$WORK/d-records.txt" python3 "$PROBE" wait-metric \
    --url "http://127.0.0.1:$(node_http_port 3)/metrics" --metric glued_records \
    --at-least "$records_a" --since-ns "$t_d" --timeout 60 || true
D_RECORDS="$(cat "$WORK/d-records.txt")"
wait "$names_pid" || true
D_LAST="$(cat "$WORK/d-names.txt")"
pulls_d="$(metric 3 glued_gossip_state_pulls_total)"

# ---- (c) ------------------------------------------------------------------------
sleep 2
rss_a="$(rss_kib "$pid_a")"; rss_d_idle="$(rss_kib "$pid_d")"
QUERIES="$WORK/queries.txt"
write_queries "$QUERIES" "$DOMAIN" host "$RECORDS"
log "(c) warm-up: dnsperf at $RSS_QPS qps for 3 s against D"
taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$(node_dns_port 3)" -d "$QUERIES" -l 3 \
    -c "$CLIENTS" -q "$OUTSTANDING" -Q "$RSS_QPS" > /dev/null 2>&1 || true
rss_d0="$(rss_kib "$pid_d")"; rss_c0="$(rss_kib "$pid_c")"
log "(c) dnsperf at $RSS_QPS qps for ${RSS_SECS}s against D"
# D's RSS every 5 s during the run.
(while kill -0 "$pid_d" 2>/dev/null; do rss_kib "$pid_d"; sleep 5; done) > "$WORK/rss-d.txt" &
sampler=$!
STARTED_PIDS+=("$sampler")
run_child "$WORK/dnsperf-rss.txt" taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 \
    -p "$(node_dns_port 3)" -d "$QUERIES" -l "$RSS_SECS" -c "$CLIENTS" \
    -q "$OUTSTANDING" -Q "$RSS_QPS" -t "$QUERY_TIMEOUT" || true
rss_d1="$(rss_kib "$pid_d")"
kill "$sampler" 2>/dev/null || true
rss_series="$(head -n $((RSS_SECS / 5 + 1)) "$WORK/rss-d.txt" | tr '\n' ' ')"
hwm_d="$(hwm_kib "$pid_d")"
rss_a1="$(rss_kib "$pid_a")"
rss_c1="$(rss_kib "$pid_c")"
answered="$(awk '/Queries completed:/ { print $3 }' "$WORK/dnsperf-rss.txt")"
lost="$(awk '/Queries lost:/ { print $3 }' "$WORK/dnsperf-rss.txt")"
qps="$(awk '/Queries per second:/ { printf "%d", $4 }' "$WORK/dnsperf-rss.txt")"

# ---- report ------------------------------------------------------------------------
load_note
echo
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); docker $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
echo "cluster: A, B, C (+ D for (b)) on 127.0.0.1, mDNS off, one secret, B/C/D bootstrapped to A; unpinned"
echo
echo "(a) record added on A (docker network connect on A's watched network) -> answered"
echo "    by B and C; $CHANGES changes, each removed afterwards (disconnect); DNS polled every ~1 ms"
echo "$RESULT_A"
echo "    gossip drops at B: $gossip_drops_b; full-state pulls by B: $pulls_b"
echo "    target: p99 < 250 ms for 'connect -> answered by B' (and for the gossip part 'A -> B')"
echo
echo "(b) $records_a records reaching a newly joined node D (A restarted with $RECORDS static records)"
printf '    %-52s %s\n' "B holds A's records again after A's restart:" "$(awk '{ print $1 " s" }' <<<"$B_AFTER_RESTART")"
printf '    %-52s %s\n' "D start -> D's glued_records gauge = $records_a:" "$(awk '{ print $1 " s" }' <<<"$D_RECORDS")"
printf '    %-52s %s\n' "D start -> D answers $last:" "$D_LAST s"
echo "    D's state pulls: $pulls_d; target: < 2 s"
echo
echo "(c) resident memory (VmRSS)"
printf '    %-52s %8s KiB\n' "B, holding $records_b_small records (after (a))" "$rss_b_small"
printf '    %-52s %8s KiB\n' "A, holding $records_a own records" "$rss_a"
printf '    %-52s %8s KiB\n' "D, holding $records_a remote records (idle)" "$rss_d_idle"
printf '    %-52s %8s KiB\n' "D after a 3 s warm-up of queries" "$rss_d0"
printf '    %-52s %8s KiB (peak VmHWM %s KiB)\n' "D after ${RSS_SECS} s of dnsperf at $RSS_QPS qps" "$rss_d1" "$hwm_d"
printf '    %-52s %8s KiB\n' "A at the same moment" "$rss_a1"
printf '    %-52s %8s KiB -> %s KiB\n' "C (same records, no queries) over the same ${RSS_SECS} s" "$rss_c0" "$rss_c1"
echo "    dnsperf (CPU $CLIENT_CPU, -Q $RSS_QPS): $answered answered ($qps qps), $lost lost"
echo "    D every 5 s during the run (KiB): $rss_series"
echo "    growth of D under queries: $((rss_d1 - rss_d0)) KiB; of C without queries: $((rss_c1 - rss_c0)) KiB"
