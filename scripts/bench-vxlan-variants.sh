#!/usr/bin/env bash
# B4 follow-up: what kernel VXLAN itself costs against its underlay, with no controller
# involved, inside one user-mode-linux boot (or on this machine's own kernel, --host).
#
#   scripts/bench-vxlan-variants.sh [--reps 7] [--secs 4] [--host] [--bin PATH]
#
# Two namespaces joined by one veth (192.0.2.1 <-> 192.0.2.2, MTU 1500), and three
# VXLANs made by hand over it, MTU 1450, head-end replication entry, learning on:
#   ours       VXLAN in a bridge, UDP checksums on (the options ovl-controller uses);
#   nocsum     the same with UDP checksums off (the IPv4 default of iproute2);
#   nobridge   the VXLAN device alone (address on it), UDP checksums on.
# With --bin, a fourth: a plaintext network made by that ovl-controller (`apply -f`,
# no agent) over the same veth.
# One iperf3 TCP stream per run (S seconds, 1 s more left out for slow start), R
# repetitions, all paths back to back in each. Prints the median throughput of each
# path and its ratio to the underlay's median.
#
# --host runs on the machine's own kernel (multi-CPU, real VXLAN and bridge code, no
# ESP needed for these paths) instead of in user-mode-linux, as a check that the ratios
# are not an artefact of UML's one CPU.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
reps=7
secs=4
inside=
host=
bin=
while (($#)); do
    case $1 in
    --reps) reps=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --inside) inside=1; shift ;;
    --host) host=1; shift ;;
    --bin) bin=$(realpath "$2"); shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $reps =~ ^[1-9][0-9]*$ && $secs =~ ^[1-9][0-9]*$ ]] || { echo "--reps and --secs are numbers" >&2; exit 2; }

if [[ -z $inside ]]; then
    [[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
    [[ -z $bin || -x $bin ]] || { echo "--bin $bin is not an executable" >&2; exit 2; }
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- command: scripts/bench-vxlan-variants.sh --reps $reps --secs $secs${host:+ --host}${bin:+ --bin $bin}"
    echo "- host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    args=(--inside --reps "$reps" --secs "$secs" ${bin:+--bin "$bin"})
    if [[ -n $host ]]; then
        OVL_ON_HOST=1 exec "$here/bench-vxlan-variants.sh" "${args[@]}"
    fi
    exec "$here/uml-run.sh" --timeout 1800 --quiet -- "$here/bench-vxlan-variants.sh" "${args[@]}"
fi

# ---- inside the guest (or on the host with --host) ---------------------------------------
[[ ${OVL_IN_UML:-} == 1 || ${OVL_ON_HOST:-} == 1 ]] || { echo "--inside is for the user-mode-linux guest" >&2; exit 1; }
run_dir=$(mktemp -d)
cleanup() {
    ip netns pids xb 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del xa 2>/dev/null || true
    ip netns del xb 2>/dev/null || true
    rm -rf "$run_dir"
}
trap cleanup EXIT
ip netns add xa
ip netns add xb
ip link add va netns xa type veth peer name vb netns xb
ip -n xa addr add 192.0.2.1/24 dev va
ip -n xb addr add 192.0.2.2/24 dev vb
for ns in xa xb; do ip -n "$ns" link set lo up; done
ip -n xa link set va up
ip -n xb link set vb up

# vxlan NS ID DEV LOCAL REMOTE CSUM ADDRESS BRIDGE(yes|no)
vxlan() {
    local ns=$1 id=$2 dev=$3 local=$4 remote=$5 csum=$6 address=$7 bridge=$8
    ip -n "$ns" link add "vx$id" type vxlan id "$id" local "$local" dstport $((4700 + id)) \
        dev "$dev" "$csum" learning
    ip -n "$ns" link set "vx$id" mtu 1450
    bridge -n "$ns" fdb append 00:00:00:00:00:00 dev "vx$id" dst "$remote"
    local holder=vx$id
    if [[ $bridge == yes ]]; then
        ip -n "$ns" link add "br$id" type bridge
        ip -n "$ns" link set "br$id" mtu 1450
        ip -n "$ns" link set "vx$id" master "br$id"
        ip -n "$ns" link set "br$id" up
        holder=br$id
    fi
    ip -n "$ns" addr add "$address" dev "$holder"
    ip -n "$ns" link set "vx$id" up
}
for v in "1 udpcsum yes" "2 noudpcsum yes" "3 udpcsum no"; do
    read -r id csum bridge <<<"$v"
    vxlan xa "$id" va 192.0.2.1 192.0.2.2 "$csum" "10.$id.0.1/24" "$bridge"
    vxlan xb "$id" vb 192.0.2.2 192.0.2.1 "$csum" "10.$id.0.2/24" "$bridge"
done
paths=("underlay 192.0.2.2" "ours 10.1.0.2" "nocsum 10.2.0.2" "nobridge 10.3.0.2")
if [[ -n $bin ]]; then
    cat >"$run_dir/plain.yaml" <<'YAML'
apiVersion: ovl/v1
cluster:
  name: variants
nodes:
  - name: a
    address: 192.0.2.1
  - name: b
    address: 192.0.2.2
networks:
  - name: plain
    vni: 400
    addresses: {a: 10.4.0.1/24, b: 10.4.0.2/24}
YAML
    for n in "xa a" "xb b"; do
        read -r ns node <<<"$n"
        ip netns exec "$ns" "$bin" apply -f "$run_dir/plain.yaml" --node "$node" \
            --state-dir "$run_dir/$node" --socket "$run_dir/$node.sock" >/dev/null
    done
    ip netns exec xa ping -c 1 -W 5 10.4.0.2 >/dev/null
    paths+=("ovl 10.4.0.2")
fi
ip netns exec xb iperf3 -s -D >/dev/null
sleep 1

results=$(mktemp)
for ((r = 1; r <= reps; r++)); do
    for path in "${paths[@]}"; do
        read -r name target <<<"$path"
        gbps=$(ip netns exec xa iperf3 -c "$target" -t "$secs" -O 1 -J |
            python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))')
        echo "rep $r $name $gbps Gbit/s" >&2
        echo "$name $gbps" >>"$results"
    done
done
if [[ ${OVL_IN_UML:-} == 1 ]]; then
    echo "- guest: Linux $(uname -r) (user-mode-linux, 1 CPU), $(iperf3 --version | head -n1)"
else
    echo "- kernel: Linux $(uname -r) (this machine's own, $(nproc) CPUs), $(iperf3 --version | head -n1)"
fi
echo
python3 - "$results" <<'PY'
import collections, statistics, sys
runs = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, gbps = line.split()
    runs.setdefault(name, []).append(float(gbps))
what = {
    "underlay": "underlay veth (MTU 1500)",
    "ours": "VXLAN in a bridge, UDP checksums on (as ovl-controller makes it)",
    "nocsum": "VXLAN in a bridge, UDP checksums off",
    "nobridge": "VXLAN alone, UDP checksums on",
    "ovl": "plaintext network made by ovl-controller apply",
}
base = statistics.median(runs["underlay"])
print("| path | Gbit/s, median | / underlay | every run (Gbit/s) |")
print("|---|---:|---:|---|")
for name, v in runs.items():
    m = statistics.median(v)
    print(f"| {what[name]} | {m:.3f} | {m / base:.3f} | {' '.join('%.2f' % x for x in v)} |")
PY
rm -f "$results"
