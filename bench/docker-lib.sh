# shellcheck shell=bash
# Shared helpers of bench/docker.sh and bench/cluster.sh, on top of
# bench/lib.sh (sourced, used read-only): installing what they need, the
# offline test image, Docker networks and containers that are always removed
# (even on Ctrl-C), starting Glued nodes on fixed loopback ports, reading
# /metrics, /proc RSS and percentiles.
#
# Every container carries the label glued-bench-run=$RUN_ID and is removed
# by that label; every network is removed by name; every Glued by its PID.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# shellcheck disable=SC2034 # used by the scripts that source this file
RUN_ID="gb$$"
IMAGE="${IMAGE:-glued-test-busybox}"
# shellcheck disable=SC2034
PROBE="$BENCH_DIR/docker-probe.py"
NODE_PORT_BASE="${NODE_PORT_BASE:-25500}" # node n: DNS +10n, HTTP +10n+1, gossip +10n+2
CREATED_NETWORKS=()
BENCH_LABEL="glued-bench-run=$RUN_ID"

# Removes every container and network this run created, then lets lib.sh
# stop the servers and remove the work directory. Idempotent.
docker_bench_cleanup() {
    local ids net pid
    # Processes first (a docker CLI killed mid-way may still create its
    # container: the listing below comes after).
    for pid in "${STARTED_PIDS[@]:-}"; do
        [ -n "$pid" ] && kill_tree "$pid"
    done
    STARTED_PIDS=()
    ids="$(docker ps -aq --filter "label=$BENCH_LABEL" 2>/dev/null || true)"
    if [ -n "$ids" ]; then
        # shellcheck disable=SC2086 # one id per word
        docker rm -f $ids >/dev/null 2>&1 || true
    fi
    for net in "${CREATED_NETWORKS[@]:-}"; do
        [ -n "$net" ] || continue
        for _ in 1 2 3 4 5; do
            docker network rm "$net" >/dev/null 2>&1 && break
            sleep 1
        done
    done
    CREATED_NETWORKS=()
    cleanup
}
trap docker_bench_cleanup EXIT
trap 'docker_bench_cleanup; trap - EXIT; exit 130' INT TERM

# Runs "$@" (stdout to file $1) as a background child and waits for it, so
# that a signal to this script interrupts the wait at once and the trap stops
# the child. Returns the child's status.
#   $1 output file  $2.. command
run_child() {
    local out=$1 pid rc=0 i
    shift
    "$@" > "$out" &
    pid=$!
    STARTED_PIDS+=("$pid")
    wait "$pid" || rc=$?
    for i in "${!STARTED_PIDS[@]}"; do
        [ "${STARTED_PIDS[$i]}" = "$pid" ] && unset 'STARTED_PIDS[i]'
    done
    return "$rc"
}

# Debian packages of these benchmarks (skipped with SKIP_INSTALL=1).
install_docker_bench_packages() {
    [ "$SKIP_INSTALL" = 1 ] && return 0
    command -v docker >/dev/null 2>&1 || die "docker CLI not found (a running Docker engine is needed)"
    local need=() pkg bin
    for pkg in dnsperf:dnsperf dnsutils:dig jq:jq python3:python3 curl:curl \
               util-linux:taskset procps:ps busybox-static:busybox; do
        bin="${pkg#*:}"; pkg="${pkg%%:*}"
        command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
    done
    [ "${#need[@]}" -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need[*]} (or install them first)"
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# The local busybox image, built offline (tests/images/build-busybox.sh).
ensure_image() {
    docker info >/dev/null 2>&1 || die "the Docker engine does not answer"
    IMAGE="$IMAGE" "$REPO_DIR/tests/images/build-busybox.sh" >&2
}

# Creates a Docker network removed at exit. $1 name.
create_network() {
    docker network create --label "$BENCH_LABEL" "$1" >/dev/null
    CREATED_NETWORKS+=("$1")
}

# Starts N sleeping containers on network $1 named $2-0 .. $2-(N-1);
# prints their names, comma-separated. $3 count.
start_pool() {
    local net=$1 prefix=$2 count=$3 i names=()
    for ((i = 0; i < count; i++)); do
        docker run -d --network "$net" --name "$prefix-$i" --label "$BENCH_LABEL" \
            "$IMAGE" sleep 3600 >/dev/null
        names+=("$prefix-$i")
    done
    local IFS=,
    echo "${names[*]}"
}

node_dns_port() { echo $((NODE_PORT_BASE + 10 * $1)); }
node_http_port() { echo $((NODE_PORT_BASE + 10 * $1 + 1)); }
node_gossip_port() { echo $((NODE_PORT_BASE + 10 * $1 + 2)); }

# The cluster key of this run (made once by `glued keygen`).
bench_key() {
    [ -s "$WORK/cluster.key" ] || "$GLUED_BIN" keygen >"$WORK/cluster.key"
    cat "$WORK/cluster.key"
}

# Environment of node number $1 (label $2), watching network $3, with the
# bootstrap peers $4 (may be empty). Extra GLUED_* may follow.
node_env() {
    local n=$1 label=$2 net=$3 peers=$4
    shift 4
    echo GLUED_DNS_BIND="127.0.0.1:$(node_dns_port "$n")" \
        GLUED_HTTP_BIND="127.0.0.1:$(node_http_port "$n")" \
        GLUED_GOSSIP_BIND="127.0.0.1:$(node_gossip_port "$n")" \
        GLUED_MDNS=false GLUED_DATA_DIR="$WORK/$label/data" \
        GLUED_NETWORK_NAME="$net" GLUED_BOOTSTRAP_PEERS="$peers" \
        GLUED_CLUSTER_SECRET="$(bench_key)" GLUED_NODE_NAME="$label" \
        GLUED_UPSTREAMS=none GLUED_DOMAIN="$DOMAIN" "$@"
}

# Endpoint id of node $2 (label), creating its key: first line of `glued id`.
#   $1 node number  $2 label
node_id() {
    mkdir -p "$WORK/$2/data"
    # shellcheck disable=SC2046 # node_env prints KEY=VALUE words
    env $(node_env "$1" "$2" none "") "$GLUED_BIN" id --config "$WORK/$2/glued.toml" | head -1
}

# Writes $WORK/$label/glued.toml: the log level and $3 static records
# (name host<i>, address host_ip <i>).  $1 label  $2 log filter  $3 records
write_node_config() {
    local label=$1 level=$2 records=$3 i
    mkdir -p "$WORK/$label/data"
    {
        echo "log = \"$level\""
        for ((i = 0; i < records; i++)); do
            printf '\n[[records]]\nname = "host%d"\nip = "%s"\n' "$i" "$(host_ip "$i")"
        done
    } > "$WORK/$label/glued.toml"
}

# Starts Glued node $1 (label $2) on CPUs $3 watching network $4 with
# bootstrap peers $5; extra GLUED_*=... may follow. Sets SERVER_PID. The log
# level is the config file's (write_node_config must have written it).
start_node() {
    local n=$1 label=$2 cpus=$3 net=$4 peers=$5
    shift 5
    # shellcheck disable=SC2046 # node_env prints KEY=VALUE words
    start_pinned "$cpus" "$label" env -u RUST_LOG $(node_env "$n" "$label" "$net" "$peers" "$@") \
        "$GLUED_BIN" run --config "$WORK/$label/glued.toml"
}

wait_node() {
    local n=$1 label=$2
    if ! wait_dns "$(node_dns_port "$n")" "probe.$DOMAIN"; then
        echo "node $label does not answer DNS; log:" >&2
        tail -20 "$WORK/$label.log" >&2
        return 1
    fi
}

# Value of the Prometheus sample $2 (exact text before the value, labels
# included) of node $1; 0 when absent.
metric() {
    curl -s "http://127.0.0.1:$(node_http_port "$1")/metrics" |
        awk -v k="$2" 'index($0, k " ") == 1 { v = $NF } END { print v + 0 }'
}

# Sum of the Docker event counters of node $1 for actions $2.. (e.g. rename).
docker_events() {
    local n=$1 total=0 a
    shift
    for a in "$@"; do
        total=$((total + $(metric "$n" "glued_docker_events_total{type=\"${a%%/*}\",action=\"${a#*/}\"}")))
    done
    echo "$total"
}

# Resident memory of PID $1 in KiB (VmRSS), and its peak (VmHWM).
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

# The glued process of a start_pinned tree (env execs glued, same PID).
glued_pid() { echo "$1"; }

# CPU ticks of all processes named $1 (e.g. dockerd), for the record.
named_ticks() {
    local total=0 pid stat
    for pid in $(pgrep -x "$1" 2>/dev/null || true); do
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
        stat="${stat##*) }"
        # shellcheck disable=SC2086 # split into fields on purpose
        set -- $stat
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

ticks_to_ms() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.0f", t * 1000 / hz }'; }
