#!/usr/bin/env bash
# B5: the agent's memory and idle CPU with 1000 peers, inside one user-mode-linux boot.
#
#   scripts/bench-agent-rss.sh [--bin PATH] [--peers 1000] [--settle 30] [--window 20] [--mem 1024M]
#
# One real agent (node n0000, 192.0.2.1, in a namespace) whose spec lists 1+P nodes:
# P synthetic peers with public keys from `ovl-controller keygen` (made on the host
# before the boot; their private keys are thrown away) and addresses in 10.200.0.0/16
# that nobody holds, and one encrypted network over all of them. n0000's name sorts
# first, so it is the dialing side for every peer: the worst case. The agent keeps
# dialing every peer with its backoff (capped at 5 s for the first 2 minutes, 120 s
# after, and then at most two such dials a second for all peers together: the steady
# state starts ~6.5 minutes in, so measure it with --settle 400).
# Measured from /proc/PID: VmHWM and VmRSS `settle` seconds after start, and CPU
# (utime+stime) over the next `window` seconds. Three cases, each with a fresh agent and state:
#   no route      no route to 10.200/16: every dial fails at once (ENETUNREACH);
#   on-link       10.200/16 on-link on the underlay: ARP never answers, so each dial
#                 hangs until ARP gives up or the 3 s connect timeout;
#   baseline      two real nodes, connected and keyed, nothing else (for comparison).
# Targets: peak RSS <= 30 MiB; idle CPU near zero.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench/lib.sh
source "$here/bench/lib.sh"

peers=1000
settle=30
window=20
mem=1024M
bin=$bench_repo/target/release/ovl-controller
inside=
while (($#)); do
    case $1 in
    --peers) peers=$2; shift 2 ;;
    --settle) settle=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    *) bench_common_arg "$@"; shift "$BENCH_SHIFT" ;;
    esac
done

if [[ -z $inside ]]; then
    bench_host_prepare agent-rss "$bin" "$mem"
    # Keys and the spec are made here: a thousand process starts are slow inside UML.
    keys=$BENCH_WORK/keys
    mkdir -p "$keys" "$BENCH_WORK/n0000"
    chmod 700 "$BENCH_WORK/n0000" "$keys"
    bench_log "keygen for 1 + $peers nodes"
    spec=$BENCH_WORK/spec.yaml
    printf 'apiVersion: ovl/v1\ncluster:\n  name: bench\nnodes:\n' >"$spec"
    printf '  - name: n0000\n    address: 192.0.2.1\n    publicKey: "%s"\n' \
        "$("$BIN" keygen --out "$BENCH_WORK/n0000/node.key")" >>"$spec"
    for ((i = 1; i <= peers; i++)); do
        printf '  - name: n%04d\n    address: 10.200.%d.%d\n    publicKey: "%s"\n' "$i" $((i / 250)) $((i % 250 + 1)) \
            "$("$BIN" keygen --out "$keys/k")" >>"$spec"
        rm -f "$keys/k"
    done
    printf 'networks:\n  - name: sec\n    vni: 300\n    encrypted: true\n' >>"$spec"
    "$BIN" validate -f "$spec" >/dev/null || bench_die "the generated spec is invalid"
    bench_host_boot "$mem" $((3 * (settle + window) + 900)) "$here/bench-agent-rss.sh" --peers "$peers" --settle "$settle" --window "$window"
    exit
fi

# ---- inside the guest -------------------------------------------------------------------
bench_guest_init "$inside"
hz=$(getconf CLK_TCK)

kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# measure LABEL NS NODE PEERS: the agent AGENT_PID was started at START; fills a row.
rows=()
notes=()
measure() {
    local label=$1 ns=$2 node=$3 npeers=$4
    local now wait_s
    now=$(date +%s.%N)
    wait_s=$(awk -v s="$START" -v n="$now" -v t="$settle" 'BEGIN { w = s + t - n; print (w > 0) ? w : 0 }')
    sleep "$wait_s"
    local hwm rss thr t0 t1 w0 w1 hwm2
    hwm=$(kib "$AGENT_PID" VmHWM)
    rss=$(kib "$AGENT_PID" VmRSS)
    thr=$(kib "$AGENT_PID" Threads)
    local gb0 ga0 gb1 ga1
    t0=$(ticks "$AGENT_PID")
    read -r gb0 ga0 <<<"$(bench_cpu_busy)"
    w0=$(date +%s.%N)
    sleep "$window"
    t1=$(ticks "$AGENT_PID")
    read -r gb1 ga1 <<<"$(bench_cpu_busy)"
    w1=$(date +%s.%N)
    local gbusy
    gbusy=$(awk -v b="$((gb1 - gb0))" -v a="$((ga1 - ga0))" 'BEGIN { printf "%.1f", a ? 100 * b / a : 0 }')
    hwm2=$(kib "$AGENT_PID" VmHWM)
    local cpu
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v w0="$w0" -v w1="$w1" 'BEGIN { printf "%.2f", 100 * (b - a) / hz / (w1 - w0) }')
    local st0 st1 seen
    st0=$(date +%s.%N)
    seen=$(bench_ctl "$ns" "$node" status -o json | jq -r '[(.agent.peers | length), ([.agent.peers[] | select(.connected)] | length)] | map(tostring) | join(" / ")')
    st1=$(date +%s.%N)
    local warn
    warn=$(grep -cE ' (WARN|ERROR) ' "$BENCH_RUN/$node/agent.log" || true)
    rows+=("| $label | $npeers | $(mib "$hwm") | $(mib "$rss") | $(mib "$hwm2") | $thr | $cpu | $((t1 - t0)) | $gbusy | $APPLY_S | $(bench_elapsed "$st0" "$st1") | $seen | $warn |")
    bench_log "$label: VmHWM $(mib "$hwm") MiB, VmRSS $(mib "$rss") MiB, CPU $cpu % over ${window}s"
    if ((warn > 0)); then
        notes+=("$label: first WARN/ERROR lines of the agent log:")
        notes+=('```')
        while IFS= read -r l; do notes+=("$l"); done <<<"$(grep -E ' (WARN|ERROR) ' "$BENCH_RUN/$node/agent.log" | cut -c1-300 | head -n 8)"
        notes+=('```')
    fi
}

# one_agent LABEL ROUTE: a fresh namespace and agent for n0000 with the big spec.
one_agent() {
    local label=$1 route=$2
    bench_pair rs0 rs1
    if [[ $route == onlink ]]; then
        ip -n rs0 route add 10.200.0.0/16 dev eth0
    fi
    local d=$BENCH_RUN/n0000
    rm -rf "$d"
    mkdir -p "$d"
    install -m 600 "$BENCH_WORK/n0000/node.key" "$d/node.key"
    START=$(date +%s.%N)
    bench_start_agent rs0 n0000 "$BENCH_WORK/spec.yaml" info
    local a0
    a0=$(date +%s.%N)
    bench_ctl rs0 n0000 apply -f "$BENCH_WORK/spec.yaml" >"$d/apply.out" 2>&1 ||
        notes+=("$label: apply via the agent exited non-zero: $(tail -n 2 "$d/apply.out" | tr '\n' ' ')")
    APPLY_S=$(bench_elapsed "$a0" "$(date +%s.%N)")
    local fdb pol sas
    fdb=$(bridge -n rs0 fdb show dev ovvx-300 | grep -c '^00:00:00:00:00:00' || true)
    pol=$(ip -n rs0 xfrm policy | grep -c '^src' || true)
    sas=$(ip -n rs0 xfrm state | grep -c '^src' || true)
    notes+=("$label: after apply, kernel objects in the namespace: $fdb FDB entries, $pol XFRM policies, $sas SAs")
    measure "$label" rs0 n0000 "$peers"
    cp "$d/agent.log" "$BENCH_WORK/logs/$label.log"
    bench_guest_cleanup
    trap 'bench_guest_cleanup' EXIT
}

one_agent "no-route" noroute
one_agent "on-link" onlink

# Baseline: two real nodes, keyed.
bench_pair rb0 rb1
rm -rf "$BENCH_RUN/x1" "$BENCH_RUN/x2"
k1=$(bench_keygen "$BENCH_RUN/x1")
k2=$(bench_keygen "$BENCH_RUN/x2")
printf 'apiVersion: ovl/v1\ncluster:\n  name: bench\nnodes:\n  - name: x1\n    address: 192.0.2.1\n    publicKey: "%s"\n  - name: x2\n    address: 192.0.2.2\n    publicKey: "%s"\nnetworks:\n  - name: sec\n    vni: 300\n    encrypted: true\n' \
    "$k1" "$k2" >"$BENCH_RUN/small.yaml"
START=$(date +%s.%N)
bench_start_agent rb0 x1 "$BENCH_RUN/small.yaml" info
pid1=$AGENT_PID
bench_start_agent rb1 x2 "$BENCH_RUN/small.yaml" info
AGENT_PID=$pid1
a0=$(date +%s.%N)
bench_ctl rb0 x1 apply -f "$BENCH_RUN/small.yaml" >/dev/null
APPLY_S=$(bench_elapsed "$a0" "$(date +%s.%N)")
bench_ctl rb1 x2 apply -f "$BENCH_RUN/small.yaml" >/dev/null
for i in $(seq 1 120); do
    bench_peers_keyed rb0 x1 1 && break
    ((i < 120)) || bench_die "baseline pair not keyed within 60 s"
    sleep 0.5
done
measure "baseline (1 peer, connected)" rb0 x1 1
bench_save_logs

{
    echo "| case | peers | VmHWM at ${settle} s (MiB) | VmRSS at ${settle} s (MiB) | VmHWM at $((settle + window)) s (MiB) | threads | CPU over ${window} s idle (%) | CPU ticks (1/$hz s) | whole guest CPU busy (%) | apply via agent (s) | \`status\` call (s) | peers in status / connected | WARN+ERROR log lines |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
    echo
    for x in "${notes[@]}"; do
        case $x in '```' | 20*) echo "$x" ;; *) echo "- $x" ;; esac
    done
} >"$BENCH_WORK/result.md"
cat "$BENCH_WORK/result.md"
