#!/usr/bin/env bash
# Rotation time by cluster size, inside one user-mode-linux boot (ESP kernel).
#
#   scripts/bench-rotate.sh [--bin PATH] [--baseline PATH] [--sizes "3 10 30"] [--reps R] [--mem 2048M]
#
# For each size N: N network namespaces on one underlay bridge (192.0.2.0/24), each with
# its own agent, key (`ovl-controller keygen`), --state-dir, --socket and --key, as in
# integration/common; one encrypted network spanning all nodes, applied through every
# agent. Once every node's `status -o json` shows all N-1 peers connected with inbound
# and outbound keys, `ovl-controller rotate` runs on every node at once and the wall time
# until all of them exited 0 is measured ("rotation of every pair": each pair is rotated
# from both of its ends at the same time). Repeated R times per size (the cluster
# settles, i.e. every node keyed again, between repetitions); the median is reported,
# with per pair = total / (N(N-1)/2). Also measured: `rotate` on one node alone (its N-1
# pairs), and the same number of concurrent `status` calls, which is the cost of merely
# starting that many CLI processes inside UML (part of every total). Diagnostics: the
# guest's CPU busy share during the rotation (/proc/stat), the CPU time all agents used
# (/proc/PID/stat), the agents' reconcile passes (`ovl_reconciles_total` from
# `agent --metrics-address`, or "reconciled the kernel" log lines for binaries without
# metrics) and the time until every node has all peers keyed again after the rotation.
# With --baseline, every size also runs with that second binary in the same boot (right
# after the first one), so that two builds can be compared.
#
# Prints a markdown table. Needs root; the binary defaults to target/release. Numbers are
# UML numbers (one CPU shared by all agents): compare sizes, not absolute values.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench/lib.sh
source "$here/bench/lib.sh"

sizes="3 10 30"
reps=3
mem=2048M
bin=$bench_repo/target/release/ovl-controller
baseline=
inside=
while (($#)); do
    case $1 in
    --baseline) baseline=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    *) bench_common_arg "$@"; shift "$BENCH_SHIFT" ;;
    esac
done

if [[ -z $inside ]]; then
    bench_host_prepare rotate "$bin" "$mem"
    if [[ -n $baseline ]]; then
        [[ -x $baseline ]] || bench_die "$baseline not found"
        cp "$baseline" "$BENCH_WORK/baseline-ovl-controller"
        echo "baseline binary: $baseline (sha256 $(sha256sum "$baseline" | cut -c1-16), built $(date -u -r "$baseline" +%Y-%m-%dT%H:%M:%SZ))" >>"$BENCH_WORK/info"
    fi
    bench_host_boot "$mem" 3000 "$here/bench-rotate.sh" --sizes "$sizes" --reps "$reps"
    exit
fi

# ---- inside the guest -------------------------------------------------------------------
bench_guest_init "$inside"

# setup_cluster N: namespaces, keys, spec, agents, apply; sets NODES, NSS.
setup_cluster() {
    local n=$1 i name ns d key
    NODES=()
    NSS=()
    bench_netns rsw
    ip -n rsw link add ub0 type bridge
    ip -n rsw link set ub0 up
    local spec=$BENCH_RUN/spec-$n.yaml
    {
        printf 'apiVersion: ovl/v1\ncluster:\n  name: bench\nnodes:\n'
    } >"$spec"
    local addrs=""
    for ((i = 1; i <= n; i++)); do
        name=$(printf 'n%02d' "$i")
        ns=r$name
        bench_netns "$ns"
        ip -n "$ns" link add eth0 type veth peer name p$i netns rsw
        ip -n rsw link set p$i master ub0 up
        ip -n "$ns" addr add 192.0.2.$i/24 dev eth0
        ip -n "$ns" link set eth0 up
        d=$BENCH_RUN/$name
        rm -rf "$d"
        key=$(bench_keygen "$d")
        printf '  - name: %s\n    address: 192.0.2.%d\n    publicKey: "%s"\n' "$name" "$i" "$key" >>"$spec"
        addrs+="${addrs:+, }$name: 10.3.0.$i/24"
        NODES+=("$name")
        NSS+=("$ns")
    done
    printf 'networks:\n  - name: sec\n    vni: 300\n    encrypted: true\n    addresses: {%s}\n' "$addrs" >>"$spec"
    AGENTS=()
    for ((i = 0; i < n; i++)); do
        bench_start_agent "${NSS[i]}" "${NODES[i]}" "$spec" info
        AGENTS+=("$AGENT_PID")
    done
    local t0
    t0=$(bench_now)
    for ((i = 0; i < n; i++)); do
        bench_ctl "${NSS[i]}" "${NODES[i]}" apply -f "$spec" >"$BENCH_RUN/${NODES[i]}/apply.out" 2>&1 ||
            { cat "$BENCH_RUN/${NODES[i]}/apply.out" >&2; bench_die "apply via the agent of ${NODES[i]} failed"; }
    done
    wait_keyed "$n" 600
    CONVERGE=$(bench_elapsed "$t0" "$(bench_now)")
}

# wait_keyed N LIMIT: until every node reports N-1 peers connected with keys.
wait_keyed() {
    local n=$1 limit=$2 i start
    start=$(date +%s)
    for ((i = 0; i < n; i++)); do
        until bench_peers_keyed "${NSS[i]}" "${NODES[i]}" $((n - 1)); do
            if (($(date +%s) - start > limit)); then
                bench_ctl "${NSS[i]}" "${NODES[i]}" status >&2 || true
                bench_die "${NODES[i]} did not have all $((n - 1)) peers keyed after ${limit}s"
            fi
            sleep 0.5
        done
    done
}

HZ=$(getconf CLK_TCK)
# agents_ticks: utime+stime of every agent of the cluster so far (1/CLK_TCK s).
agents_ticks() {
    local p
    for p in "${AGENTS[@]}"; do cat "/proc/$p/stat"; done | awk '{ t += $14 + $15 } END { print t + 0 }'
}
# reconciles: reconcile passes of every agent so far (its metrics, else its log).
METRICS_PORT=9464
reconciles() {
    local i
    if ((HAVE_METRICS)); then
        for ((i = 0; i < ${#NODES[@]}; i++)); do
            ip netns exec "${NSS[i]}" curl -s --max-time 30 "http://127.0.0.1:$METRICS_PORT/metrics" |
                awk '$1 == "ovl_reconciles_total" { print $2 }'
        done | awk '{ t += $1 } END { print t + 0 }'
    else
        cat "$BENCH_RUN"/n*/agent.log | grep -c 'reconciled the kernel' || true
    fi
}

# concurrently CMD...: runs "CMD" on every node at once (with the node's options);
# sets ELAPSED and FAILED (the nodes whose command did not exit 0).
concurrently() {
    local n=${#NODES[@]} i t0 t1
    local pids=() b0 a0 b1 a1
    local ag0 ag1 rc0 rc1
    ag0=$(agents_ticks)
    rc0=$(reconciles)
    read -r b0 a0 <<<"$(bench_cpu_busy)"
    t0=$(bench_now)
    for ((i = 0; i < n; i++)); do
        bench_ctl "${NSS[i]}" "${NODES[i]}" "$@" >"$BENCH_RUN/${NODES[i]}/cmd.out" 2>&1 &
        pids+=($!)
    done
    FAILED=()
    for ((i = 0; i < n; i++)); do
        wait "${pids[i]}" || FAILED+=("${NODES[i]}")
    done
    t1=$(bench_now)
    read -r b1 a1 <<<"$(bench_cpu_busy)"
    ag1=$(agents_ticks)
    rc1=$(reconciles)
    ELAPSED=$(bench_elapsed "$t0" "$t1")
    # The CPU time all agents used meanwhile (the rest went to the CLI processes and the
    # kernel), and their reconcile passes (from their logs) per node.
    AGENTS_CPU=$(awk -v g="$((ag1 - ag0))" -v hz="$HZ" 'BEGIN { printf "%.1f", g / hz }')
    RECONCILES=$(awk -v r="$((rc1 - rc0))" -v n="$n" 'BEGIN { printf "%.0f", r / n }')
    BUSY=$(awk -v b="$((b1 - b0))" -v a="$((a1 - a0))" 'BEGIN { printf "%.0f", a ? 100 * b / a : 0 }')
    for f in "${FAILED[@]}"; do
        bench_log "$* failed on $f: $(tail -n 3 "$BENCH_RUN/$f/cmd.out" | tr '\n' ' ')"
    done
}

teardown_cluster() {
    bench_save_logs "$1-"
    bench_guest_cleanup
    trap 'bench_guest_cleanup' EXIT
}

binaries=("current:$BENCH_WORK/ovl-controller")
[[ -x $BENCH_WORK/baseline-ovl-controller ]] && binaries+=("baseline:$BENCH_WORK/baseline-ovl-controller")
rows=()
notes=()
for n in $sizes; do
  for b in "${binaries[@]}"; do
    label=${b%%:*}
    BIN=${b#*:}
    if "$BIN" agent --help 2>/dev/null | grep -q -- --metrics-address; then
        HAVE_METRICS=1
        BENCH_AGENT_ARGS=(--metrics-address "$METRICS_PORT")
    else
        HAVE_METRICS=0
        BENCH_AGENT_ARGS=()
    fi
    pairs=$((n * (n - 1) / 2))
    bench_log "N=$n ($label binary): setting up $n namespaces and agents"
    setup_cluster "$n"
    bench_log "N=$n: all peers keyed ${CONVERGE}s after the first apply"
    concurrently status -o json
    status_overhead=$ELAPSED
    totals=()
    busy=()
    agcpu=()
    recs=()
    settle=()
    fails=0
    for ((r = 1; r <= reps; r++)); do
        concurrently rotate --timeout 600
        totals+=("$ELAPSED")
        busy+=("$BUSY")
        agcpu+=("$AGENTS_CPU")
        recs+=("$RECONCILES")
        ((${#FAILED[@]} == 0)) || { fails=$((fails + ${#FAILED[@]})); notes+=("N=$n ($label binary) rep $r: rotate failed on ${FAILED[*]}: $(tail -n 1 "$BENCH_RUN/${FAILED[0]}/cmd.out")"); }
        bench_log "N=$n ($label) rep $r: every node rotated in ${ELAPSED}s, guest CPU ${BUSY}% busy, agents used ${AGENTS_CPU}s of CPU, ${RECONCILES} reconcile passes per agent (failed: ${FAILED[*]:-none})"
        t0=$(bench_now)
        sleep 3 # GRACE (2 s) for retired SAs
        wait_keyed "$n" 600
        settle+=("$(bench_elapsed "$t0" "$(bench_now)")")
    done
    # One node alone: its N-1 pairs.
    t0=$(bench_now)
    if ! bench_ctl "${NSS[0]}" "${NODES[0]}" rotate --timeout 600 >"$BENCH_RUN/${NODES[0]}/cmd.out" 2>&1; then
        notes+=("N=$n ($label binary): rotate on ${NODES[0]} alone failed: $(tail -n 2 "$BENCH_RUN/${NODES[0]}/cmd.out" | tr '\n' ' ')")
    fi
    alone=$(bench_elapsed "$t0" "$(bench_now)")
    sleep 3
    wait_keyed "$n" 600
    # Sanity: the encrypted network carries traffic after all that.
    if ! ip netns exec "${NSS[0]}" ping -c 2 -i 0.2 -W 2 -q "10.3.0.$n" >/dev/null 2>&1; then
        notes+=("N=$n ($label binary): ${NODES[0]} -> 10.3.0.$n did not answer a ping after the rotations")
    fi
    # Agents' memory at this size.
    hwm=$(for p in "${AGENTS[@]}"; do awk '/VmHWM/ {print $2}' "/proc/$p/status"; done | sort -n | tail -n1)
    med=$(bench_median "${totals[@]}")
    minmax=$(printf '%s\n' "${totals[@]}" | sort -g | sed -n '1p;$p' | paste -sd- -)
    per_pair=$(awk -v t="$med" -v p="$pairs" 'BEGIN { printf "%.1f", t * 1000 / p }')
    rows+=("| $label | $n | $pairs | $CONVERGE | $med | $minmax | $per_pair | $(bench_median "${busy[@]}" | cut -d. -f1) | $(bench_median "${agcpu[@]}" | xargs printf '%.1f') | $(bench_median "${recs[@]}" | cut -d. -f1) | $(bench_median "${settle[@]}") | $alone | $status_overhead | $((hwm / 1024)) | $fails |")
    errs=$(cat "$BENCH_RUN"/n*/agent.log | grep -cE ' (WARN|ERROR) ' || true)
    notes+=("N=$n ($label binary): agent log lines at WARN or ERROR, all nodes: $errs")
    teardown_cluster "$label-N$n"
  done
done

{
    echo "| binary | nodes | pairs | all keyed after apply (s) | rotate on every node at once, median of $reps (s) | min-max (s) | ms per pair | guest CPU busy during it (%) | CPU time of all agents during it (s) | reconcile passes per agent | all keyed again after it (s) | one node alone (s) | N concurrent \`status\` calls (s) | max agent VmHWM (MiB) | failed rotates |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
    echo
    for x in "${notes[@]}"; do echo "- $x"; done
} >"$BENCH_WORK/result.md"
cat "$BENCH_WORK/result.md"
