# Helpers shared by scripts/bench-*.sh (sourced, not run).
#
# Each benchmark script runs in two halves:
#   host:  checks, copies the binary to a work dir (so a concurrent `cargo build` cannot
#          swap it mid-run), boots one user-mode-linux guest with scripts/uml-run.sh and
#          runs itself inside with `--inside WORKDIR`;
#   guest: builds namespaces and agents, measures, prints a markdown table and leaves
#          it in WORKDIR/result.md. A trap kills every process it started (by PID) and
#          deletes every namespace it made, on success and on failure.
#
# Only namespaces created by the script ever carry traffic; all addresses are from the
# documentation ranges (192.0.2.0/24) or private ranges local to the guest.

bench_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

bench_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bench_die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

# bench_common_arg ARGS...: the options every benchmark script takes, at the front of
# its remaining arguments: --bin PATH, --mem SIZE, --inside WORKDIR (they set bin, mem
# and inside) and -h/--help (prints the script's header comment and exits). Sets
# BENCH_SHIFT to the number of arguments it used; any other argument is an error.
bench_common_arg() {
    BENCH_SHIFT=2
    case $1 in
    --bin) bin=$2 ;;
    --mem) mem=$2 ;;
    --inside) inside=$2 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) bench_die "unknown argument $1 (see --help)" ;;
    esac
}

# ---- host side -------------------------------------------------------------------------

# bench_host_prepare NAME BIN MEM: makes the work dir (BENCH_WORK), copies the binary
# into it and records the run's facts (date, binary, profile, git, host) in BENCH_WORK/info.
bench_host_prepare() {
    local name=$1 bin=$2 mem=$3
    [[ $(id -u) == 0 ]] || bench_die "run as root (network namespaces, user-mode-linux)"
    [[ -x $bin ]] || bench_die "$bin not found: build it first (cargo build --release) or pass --bin"
    BENCH_WORK=$(mktemp -d "/tmp/ovl-bench-$name.XXXXXXXX")
    chmod 755 "$BENCH_WORK"
    cp "$bin" "$BENCH_WORK/ovl-controller"
    BIN=$BENCH_WORK/ovl-controller
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "binary: $bin (sha256 $(sha256sum "$bin" | cut -c1-16), built $(date -u -r "$bin" +%Y-%m-%dT%H:%M:%SZ))"
        case $bin in
        */release/*) echo "profile: release" ;;
        */debug/*) echo "profile: debug" ;;
        *) echo "profile: unknown" ;;
        esac
        echo "git (work tree now; the binary may be older): $(git -C "$bench_repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(
            [[ -n $(git -C "$bench_repo" status --porcelain --untracked-files=no 2>/dev/null) ]] && echo ' + uncommitted changes in the work tree')"
        echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
        echo "guest: user-mode-linux $(/usr/bin/linux.uml --version 2>/dev/null | head -n1), mem=$mem, 1 CPU"
    } >"$BENCH_WORK/info"
    bench_log "work dir $BENCH_WORK; binary $bin"
}

# bench_host_boot MEM TIMEOUT SCRIPT [ARGS...]: runs SCRIPT --inside BENCH_WORK ARGS...
# in one UML guest, prints the facts and the result, removes the work dir (kept on
# failure or with OVL_BENCH_KEEP=1). Returns the guest's exit status.
bench_host_boot() {
    local mem=$1 timeout=$2 script=$3
    shift 3
    local rc=0
    "$bench_repo/scripts/uml-run.sh" --mem "$mem" --timeout "$timeout" --env NO_COLOR=1 \
        -- "$script" --inside "$BENCH_WORK" "$@" || rc=$?
    if [[ -s $BENCH_WORK/result.md ]]; then
        echo
        echo "----- result -----"
        sed 's/^/- /' "$BENCH_WORK/info"
        echo
        cat "$BENCH_WORK/result.md"
    fi
    if ((rc != 0)) || [[ ${OVL_BENCH_KEEP:-0} == 1 ]]; then
        bench_log "exit status $rc; work dir kept: $BENCH_WORK (agent logs under $BENCH_WORK/logs)"
    else
        rm -rf -- "$BENCH_WORK"
    fi
    return "$rc"
}

# ---- guest side ------------------------------------------------------------------------

BENCH_PIDS=()
BENCH_NETNS=()
BENCH_AGENT_ARGS=() # extra options for every agent bench_start_agent starts

bench_guest_cleanup() {
    local pid ns
    for pid in "${BENCH_PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    BENCH_PIDS=()
    for ns in "${BENCH_NETNS[@]}"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    BENCH_NETNS=()
}

# bench_guest_init WORK: checks we are in the UML guest and sets the trap.
bench_guest_init() {
    BENCH_WORK=$1
    [[ ${OVL_IN_UML:-} == 1 ]] || bench_die "--inside is for the user-mode-linux guest (run the script without it)"
    [[ -x $BENCH_WORK/ovl-controller ]] || bench_die "no binary in $BENCH_WORK"
    BIN=$BENCH_WORK/ovl-controller
    # Private node files live on the guest's tmpfs, not on hostfs (whose every file
    # operation is a host system call): closer to a real node's local disk.
    BENCH_RUN=/run/ovl-bench
    mkdir -p "$BENCH_RUN" "$BENCH_WORK/logs"
    trap 'bench_guest_cleanup' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_now() { date +%s.%N; }
bench_elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# bench_netns NAME: creates a namespace, remembered for cleanup.
bench_netns() {
    ip netns add "$1"
    BENCH_NETNS+=("$1")
    ip -n "$1" link set lo up
}

# bench_pair NS1 NS2: two namespaces (bench_netns) joined by one veth, eth0 in each
# (MTU 1500, up), with 192.0.2.1/24 in NS1 and 192.0.2.2/24 in NS2.
bench_pair() {
    bench_netns "$1"
    bench_netns "$2"
    ip -n "$1" link add eth0 mtu 1500 type veth peer name eth0 netns "$2"
    ip -n "$1" addr add 192.0.2.1/24 dev eth0
    ip -n "$2" addr add 192.0.2.2/24 dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$2" link set eth0 up
}

# bench_keygen DIR: node key in DIR/node.key; prints the public key.
bench_keygen() {
    mkdir -p "$1"
    "$BIN" keygen --out "$1/node.key"
}

# bench_opts NAME: the per-node options (as for integration/common agent_opts).
bench_opts() {
    local d=$BENCH_RUN/$1
    echo "--node $1 --key $d/node.key --state-dir $d/state --socket $d/agent.sock"
}

# bench_start_agent NS NODE SPEC [LEVEL]: starts the node's agent in NS (with
# BENCH_AGENT_ARGS), logging to DIR/agent.log; waits for its socket. Sets AGENT_PID.
bench_start_agent() {
    local ns=$1 node=$2 spec=$3 level=${4:-info}
    local d=$BENCH_RUN/$node
    mkdir -p "$d"
    # `ip netns exec` execs the command in place: $! is the agent itself.
    # shellcheck disable=SC2046
    ip netns exec "$ns" "$BIN" agent -f "$spec" --log-level "$level" $(bench_opts "$node") "${BENCH_AGENT_ARGS[@]}" \
        </dev/null >>"$d/agent.log" 2>&1 &
    AGENT_PID=$!
    BENCH_PIDS+=("$AGENT_PID")
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -S $d/agent.sock ]] && return 0
        kill -0 "$AGENT_PID" 2>/dev/null || break
        sleep 0.05
    done
    tail -n 20 "$d/agent.log" >&2
    bench_die "agent of $node did not open its socket"
}

# bench_ctl NS NODE ARGS...: an ovl-controller subcommand with the node's options.
bench_ctl() {
    local ns=$1 node=$2
    shift 2
    # shellcheck disable=SC2046
    ip netns exec "$ns" "$BIN" "$@" $(bench_opts "$node")
}

# bench_peers_keyed NS NODE WANT: true when the node's agent reports WANT peers, every
# one connected with inbound and outbound keys.
bench_peers_keyed() {
    local ns=$1 node=$2 want=$3
    bench_ctl "$ns" "$node" status -o json 2>/dev/null | jq -e --argjson want "$want" '
        (.agent.peers | length) == $want and
        all(.agent.peers[]; .connected and (.inbound | length) > 0 and (.outbound | length) > 0)
    ' >/dev/null 2>&1
}

# bench_save_logs [PREFIX]: copies the agents' logs to the work dir (on the host file
# system) as PREFIXNODE.log.
bench_save_logs() {
    local d
    for d in "$BENCH_RUN"/*/; do
        [[ -f $d/agent.log ]] && cp "$d/agent.log" "$BENCH_WORK/logs/${1:-}$(basename "$d").log"
    done
    return 0
}

# bench_cpu_busy: "busy total" jiffies of the (guest's) CPUs so far, from /proc/stat.
bench_cpu_busy() {
    awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# bench_median NUMBERS...: the median (mean of the middle two for an even count).
bench_median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
