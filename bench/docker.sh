#!/usr/bin/env bash
# Docker benchmarks of Glued (SPEC §9, issue 3), against the local engine:
#
#  (a) `docker run` -> name resolvable: COUNT containers started one after
#      another on a network created here and watched by one Glued; for each,
#      the time from just before `docker run -d` until Glued answers the
#      container's name with its address (polled every ~1 ms), and the part
#      of it taken by `docker run -d` itself. p50 / p99.
#  (b) local answers under churn: Glued pinned to CPU 0 with one DNS thread
#      and 1 000 static names (as bench/dns.sh), dnsperf on CPU 1, four
#      saturated passes: quiet1, churn, quiet2, control. During "churn" a pool
#      of containers on the watched network is renamed back and forth through
#      the Engine API at CHURN_RATE changes/s (each rename is one event and
#      one change of the container's records; connect/disconnect tops out near
#      10/s on a 2-core host, and in parallel can leave a stale endpoint in
#      Docker 20.10); the achieved rate is read from Glued's /metrics event
#      counter. "control" renames the same number of containers on a network
#      Glued does not watch: the engine's own load, without record changes.
#      Prints qps, CPU µs per query (Glued's own, and everything on CPU 0),
#      and the ratio churn / mean(quiet1, quiet2) (target ≥ 0.95).
#
# Every container and network it creates is removed at exit, Ctrl-C included.
# Usage: bench/docker.sh     (root, fresh Debian 12 with a running Docker engine)
# Knobs: COUNT=50 CHURN_RATE=100 CHURN_POOL=32 DURATION=10 PARTS="a b"
#        SKIP_INSTALL=1 SKIP_BUILD=1 KEEP_WORK=1 (and those of bench/lib.sh)

source "$(dirname "${BASH_SOURCE[0]}")/docker-lib.sh"

COUNT="${COUNT:-50}"
CHURN_RATE="${CHURN_RATE:-100}"
CHURN_POOL="${CHURN_POOL:-32}"
PARTS="${PARTS:-a b}"

install_docker_bench_packages
ensure_image
build_glued

NET="gbench-$RUN_ID"
create_network "$NET"
log "network $NET"

RESULT_A=""
if [[ " $PARTS " == *" a "* ]]; then
    write_node_config a info 0
    log "(a) Glued watching $NET; $COUNT x docker run"
    start_node 0 a 0-1 "$NET" ""
    pid_a=$SERVER_PID
    wait_node 0 a
    run_child "$WORK/result-a.txt" python3 "$PROBE" run-latency --net "$NET" --image "$IMAGE" \
        --prefix "$RUN_ID-run-" --label "$BENCH_LABEL" --count "$COUNT" \
        --dns "127.0.0.1:$(node_dns_port 0)" --domain "$DOMAIN" --samples "$WORK/run-latency.txt"
    RESULT_A="$(cat "$WORK/result-a.txt")"
    watched_a="$(metric 0 glued_docker_containers_watched)"
    stop_server "$pid_a"
    ids="$(docker ps -aq --filter "name=^$RUN_ID-run-")"
    # shellcheck disable=SC2086 # one id per word
    [ -n "$ids" ] && docker rm -f $ids >/dev/null
fi

declare -A RES DOCKERD
declare -A CHURN_LINE
if [[ " $PARTS " == *" b "* ]]; then
    log "(b) pool of $CHURN_POOL containers on $NET"
    pool="$(start_pool "$NET" "$RUN_ID-churn" "$CHURN_POOL")"
    # Control: the same churn on a network Glued does not watch (the engine's
    # own cost on the machine, and the event stream, without record changes).
    OTHER="gbench-$RUN_ID-other"
    create_network "$OTHER"
    other_pool="$(start_pool "$OTHER" "$RUN_ID-other" "$CHURN_POOL")"
    write_node_config b warn "$ZONE_NAMES"
    start_node 1 b "$SERVER_CPU" "$NET" "" GLUED_DNS_THREADS=1
    pid_b=$SERVER_PID
    wait_node 1 b
    port_b="$(node_dns_port 1)"
    check_answers "$port_b" "host1.$DOMAIN" "$(host_ip 1)" "nx-check.$DOMAIN" ||
        die "Glued answers wrongly"
    QUERIES="$WORK/queries.txt"
    write_queries "$QUERIES" "$DOMAIN" host "$ZONE_NAMES"
    taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port_b" -d "$QUERIES" -l 1 \
        -c "$CLIENTS" -q "$OUTSTANDING" > /dev/null 2>&1 || true

    PASSES="quiet1 churn quiet2 control"
    for pass in $PASSES; do
        d0="$(named_ticks dockerd)"; k0="$(named_ticks containerd)"
        if [ "$pass" = churn ] || [ "$pass" = control ]; then
            e0="$(docker_events 1 container/rename)"
            t0="$(date +%s%N)"
            churn_pool="$pool"
            [ "$pass" = control ] && churn_pool="$other_pool"
            taskset -c "$CLIENT_CPU" python3 "$PROBE" churn --pool "$churn_pool" \
                --rate "$CHURN_RATE" --duration "$((DURATION + 1))" > "$WORK/churn.txt" &
            churn_pid=$!
            STARTED_PIDS+=("$churn_pid")
            sleep 0.5 # the churn is running before dnsperf starts
        fi
        log "(b) $pass: dnsperf ${DURATION}s"
        RES[$pass]="$(measure "$pid_b" "$port_b" "$QUERIES" "b-$pass" 0)"
        if [ "$pass" = churn ] || [ "$pass" = control ]; then
            e1="$(docker_events 1 container/rename)"
            t1="$(date +%s%N)"
            wait "$churn_pid" || true
            read -r n_done n_errors took < "$WORK/churn.txt" || true
            CHURN_LINE[$pass]="$(awk -v e="$((e1 - e0))" -v ns="$((t1 - t0))" -v d="$n_done" -v er="$n_errors" -v t="$took" \
                -v want="$CHURN_RATE" -v p="$pass" 'BEGIN { printf "%s: asked %d changes/s; renames done by the engine %d in %.1f s (%d errors);\n    rename events counted by Glued during the dnsperf pass: %d in %.1f s = %.1f/s", p, want, d, t, er, e, ns / 1e9, e / (ns / 1e9) }')"
        fi
        d1="$(named_ticks dockerd)"; k1="$(named_ticks containerd)"
        DOCKERD[$pass]="$(ticks_to_ms $((d1 - d0)))/$(ticks_to_ms $((k1 - k0)))"
    done
    watched_b="$(metric 1 glued_docker_containers_watched)"
    stop_server "$pid_b"
fi

load_note
echo
describe_machine
echo "docker: $(docker version --format '{{.Server.Version}}' 2>/dev/null), image $IMAGE, network $NET"
if [ -n "$RESULT_A" ]; then
    echo
    echo "(a) docker run -> name resolvable through Glued ($COUNT containers, one at a time;"
    echo "    Glued unpinned, default threads; DNS polled every ~1 ms)"
    echo "$RESULT_A"
    echo "    Glued watched $watched_a containers at the end; samples: KEEP_WORK=1 -> $WORK/run-latency.txt"
fi
if [ -n "${RES[churn]:-}" ]; then
    echo
    echo "(b) local answers while containers churn ($ZONE_NAMES static names, $CHURN_POOL containers on the"
    echo "    watched network; Glued on CPU $SERVER_CPU with 1 DNS thread, dnsperf and the churn driver on CPU $CLIENT_CPU)"
    print_header
    for pass in $PASSES; do print_row "$pass" "${RES[$pass]}"; done
    if declare -F print_noise_legend >/dev/null; then print_noise_legend; fi
    echo "(dockerd is not pinned: during churn and control part of its work runs on CPU $SERVER_CPU)"
    echo "${CHURN_LINE[churn]}"
    echo "${CHURN_LINE[control]} (control: renames on network $OTHER, not watched)"
    echo -n "dockerd/containerd CPU ms during each pass:"
    for pass in $PASSES; do echo -n " $pass ${DOCKERD[$pass]}"; done
    echo
    base="$(awk '{ q += $1 } END { printf "%d", q / NR }' <<<"${RES[quiet1]}
${RES[quiet2]}")"
    base_us="$(awk '{ q += $6 } END { printf "%.2f", q / NR }' <<<"${RES[quiet1]}
${RES[quiet2]}")"
    churn_q="$(awk '{ print $1 }' <<<"${RES[churn]}")"
    churn_us="$(awk '{ print $6 }' <<<"${RES[churn]}")"
    echo "qps ratio churn / no churn (mean of quiet1, quiet2 = $base) = $(ratio "$churn_q" "$base") (target ≥ 0.95)"
    echo "Glued CPU µs/query: no churn $base_us, churn $churn_us (ratio $(ratio "$churn_us" "$base_us"))"
    ctl_q="$(awk '{ print $1 }' <<<"${RES[control]}")"
    ctl_us="$(awk '{ print $6 }' <<<"${RES[control]}")"
    echo "control (engine busy, no record change): qps ratio $(ratio "$ctl_q" "$base"), Glued CPU µs/query $ctl_us"
    echo "Glued's own cost of the record changes, churn / control (the engine equally busy in both): qps ratio $(ratio "$churn_q" "$ctl_q")"
    echo "Glued watched $watched_b containers at the end"
fi
