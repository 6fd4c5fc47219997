#!/usr/bin/env bash
# Resident memory per remote record (issue 9 item 6): the same measure as
# bench/cluster.sh (c) without Docker or root. On loopback, mDNS off:
#   1. A starts with no records, E joins it: VmRSS of E (empty node);
#   2. A is restarted with RECORDS static records (same key, same id), D
#      joins it: once D's glued_records gauge equals A's, VmRSS of D.
#   3. F joins with one record: once D holds it too (one more publish, so
#      D's registry holds two tables), VmRSS of D again.
# Prints them and (D - E) / RECORDS in bytes. Each node is given 2 s to
# settle before its RSS is read (as cluster.sh does).
# Usage: bench/remote-rss.sh   Knobs: RECORDS=10000 BASE_PORT=26300 SKIP_BUILD=1
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RECORDS="${RECORDS:-10000}"
BASE_PORT="${BASE_PORT:-26300}"
DOMAIN=glued.internal
GLUED_BIN="${GLUED_BIN:-$REPO_DIR/target/release/glued}"
WORK="$(mktemp -d /tmp/glued-rss.XXXXXX)"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ "${SKIP_BUILD:-0}" = 1 ] || (cd "$REPO_DIR" && cargo build --release --quiet --bin glued)
"$GLUED_BIN" keygen > "$WORK/cluster.key"

port() { echo $((BASE_PORT + 10 * $1 + $2)); } # $1 node, $2: 0 dns 1 http 2 gossip
config() { # $1 label $2 records
    mkdir -p "$WORK/$1/data"
    {
        echo 'log = "warn"'
        for ((i = 0; i < $2; i++)); do
            printf '\n[[records]]\nname = "host%d"\nip = "10.1.%d.%d"\n' "$i" $((i / 250)) $((i % 250 + 1))
        done
    } > "$WORK/$1/glued.toml"
}
envs() { # $1 node $2 label $3 peers
    echo GLUED_DNS_BIND=127.0.0.1:"$(port "$1" 0)" GLUED_HTTP_BIND=127.0.0.1:"$(port "$1" 1)" \
        GLUED_GOSSIP_BIND=127.0.0.1:"$(port "$1" 2)" GLUED_MDNS=false \
        GLUED_DATA_DIR="$WORK/$2/data" GLUED_NETWORK_NAME=glued-rss-absent \
        GLUED_DOCKER_HOST=unix://$WORK/no-docker.sock \
        GLUED_BOOTSTRAP_PEERS="$3" GLUED_CLUSTER_SECRET="$(cat "$WORK/cluster.key")" \
        GLUED_NODE_NAME="$2" GLUED_UPSTREAMS=none GLUED_DOMAIN="$DOMAIN"
}
start() { # $1 node $2 label $3 peers; sets PID
    # shellcheck disable=SC2046
    env -u RUST_LOG $(envs "$1" "$2" "$3") "$GLUED_BIN" run --config "$WORK/$2/glued.toml" \
        > "$WORK/$2.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
}
metric() { # $1 node $2 name
    curl -s "http://127.0.0.1:$(port "$1" 1)/metrics" |
        awk -v k="$2" 'index($0, k " ") == 1 { v = $NF } END { print v + 0 }'
}
wait_metric() { # $1 node $2 name $3 at least; 120 s
    for _ in $(seq 1 1200); do
        [ "$(metric "$1" "$2")" -ge "$3" ] 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
wait_http() { # $1 node; 30 s
    for _ in $(seq 1 300); do
        curl -sf -o /dev/null "http://127.0.0.1:$(port "$1" 1)/metrics" && return 0
        sleep 0.1
    done
    return 1
}
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

config a 0; config e 0; config d 0
# shellcheck disable=SC2046
id_a="$(env $(envs 0 a "") "$GLUED_BIN" id --config "$WORK/a/glued.toml" | head -1)"
peer="$id_a@127.0.0.1:$(port 0 2)"
start 0 a ""; pid_a=$PID
wait_http 0 || die "A does not start: $(tail -5 "$WORK/a.log")"
start 1 e "$peer"; pid_e=$PID
wait_metric 1 glued_gossip_neighbors 1 || die "E never joined A: $(tail -5 "$WORK/e.log")"
sleep 2
rss_e="$(rss "$pid_e")"
kill "$pid_e" "$pid_a"; wait "$pid_e" "$pid_a" 2>/dev/null || true
config a "$RECORDS"
start 0 a ""; pid_a=$PID
wait_metric 0 glued_records "$RECORDS" || die "A does not hold its records"
start 2 d "$peer"; pid_d=$PID
wait_metric 2 glued_records "$RECORDS" || die "D never got A's records: $(tail -5 "$WORK/d.log")"
sleep 2
rss_d="$(rss "$pid_d")"
# 3. One more change reaches D (F joins with one record): D's registry
#    publishes again, and now holds the published table and its spare.
config f 1
start 3 f "$peer"
wait_metric 2 glued_records $((RECORDS + 1)) || die "D never got F's record"
sleep 2
rss_d2="$(rss "$pid_d")"
echo "records=$RECORDS rss_empty_kib=$rss_e rss_remote_kib=$rss_d" \
    "bytes_per_record=$(( (rss_d - rss_e) * 1024 / RECORDS ))" \
    "rss_after_change_kib=$rss_d2 bytes_per_record_after_change=$(( (rss_d2 - rss_e) * 1024 / RECORDS ))" \
    "rss_owner_kib=$(rss "$pid_a")"
