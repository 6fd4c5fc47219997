#!/usr/bin/env bash
# The fleet simulation (issue 9, README "Fleet simulation"): the replication
# core of NODES nodes over iroh-gossip's own HyParView/PlumTree state
# machines on a seeded simulated network (examples/sim.rs,
# src/gossip/sim.rs). Deterministic: a seed gives the same figures on any
# machine; only wall_s and the memory depend on it.
#
# Prints, per seed, the example's stderr summary (sim_s, wall_s, suspects,
# refutes, deaths, pulls; the steady minute after forming) and its line of
# figures (form_s change_p50_ms change_p99_ms heal_s restart_s
# msgs_per_node_s bytes_per_node_s join_msgs_total join_one_msgs
# join_one_bytes), then the peak RSS of the run.
# Targets: form < 5 s, change p99 < 250 ms (here the PlumTree tree's depth
# over 5-60 ms links), heal < 30 s, restart < 5 s, steady traffic per node
# < 50 KB/s at 1 000 nodes.
#
# Usage: bench/sim.sh     (no root; 1 000 nodes, `all`: about 11 min of CPU
#                          and 11 GB of memory per seed, seeds run one after
#                          the other)
# Knobs: NODES=1000 SEEDS="1" SCENARIO=all SKIP_BUILD=1
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES="${NODES:-1000}"
SEEDS="${SEEDS:-1}"
SCENARIO="${SCENARIO:-all}"
SIM="$REPO_DIR/target/release/examples/sim"
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$REPO_DIR" && cargo build --release --quiet --example sim)
echo "date=$(date -u +%Y-%m-%dT%H:%MZ) commit=$(git -C "$REPO_DIR" describe --always --dirty) nodes=$NODES scenario=$SCENARIO"
for seed in $SEEDS; do
    out="$(mktemp)"
    /usr/bin/time -f "peak_rss_mib=%M" -o "$out" \
        "$SIM" --nodes "$NODES" --seed "$seed" --scenario "$SCENARIO" 2>&1
    awk -F= '{printf "%s=%d\n", $1, $2 / 1024}' "$out"
    rm -f "$out"
done
