#!/usr/bin/env bash
# Fleet benchmark of Glued (SPEC §9, issue 9): NODES real `glued run`
# processes, each in its own network namespace, on two bridges joined by a
# trunk (cut for the partition), mDNS off, every node bootstrapped from the
# seed only. bench/fleet.py creates the namespaces, starts and stops the
# nodes and measures; this script installs, builds, makes the Docker network
# whose container connects are the record changes, and cleans up.
#
# Prints key=value figures (see bench/fleet.py for each):
#   form_s change_p50_ms change_p99_ms heal_s restart_s
#   rss_median_mib rss_max_mib rss_peak_mib
#   bytes_per_node_s_idle_median bytes_per_node_s_median bytes_per_node_s_peak
# Targets (SPEC §9): form < 5 s, change p99 < 250 ms, heal < 30 s,
# restart (after 10 minutes of quiet) < 5 s.
#
# Usage: bench/fleet.sh    (root, Debian 12 with a running Docker engine;
#                           about 12 minutes with QUIET=600)
# Knobs: NODES=32 LEASE=6 PARTITION=14 QUIET=600 CHANGES=100 POOL=4
#        PHASES=form,idle,change,heal,restart SKIP_INSTALL=1 SKIP_BUILD=1
#        KEEP_WORK=1 GLUED_LOG=info,iroh=warn,iroh_gossip=warn
#        GLUED=path/to/glued (use that binary, no build)
# Without Docker (NO_DOCKER=1) the change phase is skipped.
#
# The same harness in CI: tests/fleet/main.rs (12 nodes; its restart test
# waits GLUED_FLEET_QUIET_SECS, 65 s by default).

source "$(dirname "${BASH_SOURCE[0]}")/docker-lib.sh"

NODES="${NODES:-32}"
LEASE="${LEASE:-6}"
PARTITION="${PARTITION:-14}"
QUIET="${QUIET:-600}"
CHANGES="${CHANGES:-100}"
POOL="${POOL:-4}"
PHASES="${PHASES:-form,idle,change,heal,restart}"
NO_DOCKER="${NO_DOCKER:-0}"

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
command -v ip >/dev/null 2>&1 || die "ip (iproute2) not found"
command -v python3 >/dev/null 2>&1 || die "python3 not found"
if [ -n "${GLUED:-}" ]; then GLUED_BIN="$GLUED"; else build_glued; fi

net_args=()
if [ "$NO_DOCKER" != 1 ]; then
    install_docker_bench_packages
    ensure_image
    NET="gfleet-$RUN_ID"
    PARK="gfleet-$RUN_ID-park"
    create_network "$NET"
    create_network "$PARK"
    pool="$(start_pool "$PARK" "$RUN_ID-c" "$POOL")"
    net_args=(--net "$NET" --pool "$pool")
    log "node 1 watches $NET; pool of $POOL containers parked on $PARK"
fi

log "$NODES nodes, lease $LEASE s, partition $PARTITION s, quiet $QUIET s"
# fleet.py removes its namespaces and stops its nodes itself (also on
# SIGTERM); run_child lets the trap stop it on Ctrl-C.
run_child "$WORK/figures" python3 "$BENCH_DIR/fleet.py" \
    --glued "$GLUED_BIN" --work "$WORK" --nodes "$NODES" --lease "$LEASE" \
    --partition "$PARTITION" --quiet "$QUIET" --changes "$CHANGES" \
    --phases "$PHASES" "${net_args[@]}"
cat "$WORK/figures"
