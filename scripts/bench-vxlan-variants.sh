#!/usr/bin/env bash
# B4 follow-up: what kernel VXLAN itself costs against its underlay, with no controller
# involved, inside one user-mode-linux boot.
#
#   scripts/bench-vxlan-variants.sh [--reps 7] [--secs 4]
#
# Two namespaces joined by one veth (192.0.2.1 <-> 192.0.2.2, MTU 1500), and three
# VXLANs made by hand over it, MTU 1450, head-end replication entry, learning on:
#   ours       VXLAN in a bridge, UDP checksums on (the options ovl-controller uses);
#   nocsum     the same with UDP checksums off (the IPv4 default of iproute2);
#   nobridge   the VXLAN device alone (address on it), UDP checksums on.
# One iperf3 TCP stream per run (S seconds, 1 s more left out for slow start), R
# repetitions, the four paths back to back in each. Prints the median throughput of
# each path and its ratio to the underlay's median.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
reps=7
secs=4
inside=
while (($#)); do
    case $1 in
    --reps) reps=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --inside) inside=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $reps =~ ^[1-9][0-9]*$ && $secs =~ ^[1-9][0-9]*$ ]] || { echo "--reps and --secs are numbers" >&2; exit 2; }

if [[ -z $inside ]]; then
    [[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- command: scripts/bench-vxlan-variants.sh --reps $reps --secs $secs"
    echo "- host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs"
    exec "$here/uml-run.sh" --timeout 1800 --quiet -- "$here/bench-vxlan-variants.sh" \
        --inside --reps "$reps" --secs "$secs"
fi

# ---- inside the guest -------------------------------------------------------------------
[[ ${OVL_IN_UML:-} == 1 ]] || { echo "--inside is for the user-mode-linux guest" >&2; exit 1; }
cleanup() {
    ip netns pids xb 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del xa 2>/dev/null || true
    ip netns del xb 2>/dev/null || true
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
ip netns exec xb iperf3 -s -D >/dev/null
sleep 1

results=$(mktemp)
for ((r = 1; r <= reps; r++)); do
    for path in "underlay 192.0.2.2" "ours 10.1.0.2" "nocsum 10.2.0.2" "nobridge 10.3.0.2"; do
        read -r name target <<<"$path"
        gbps=$(ip netns exec xa iperf3 -c "$target" -t "$secs" -O 1 -J |
            python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))')
        echo "rep $r $name $gbps Gbit/s" >&2
        echo "$name $gbps" >>"$results"
    done
done
echo "- guest: Linux $(uname -r) (user-mode-linux, 1 CPU), $(iperf3 --version | head -n1)"
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
}
base = statistics.median(runs["underlay"])
print("| path | Gbit/s, median | / underlay | every run (Gbit/s) |")
print("|---|---:|---:|---|")
for name, v in runs.items():
    m = statistics.median(v)
    print(f"| {what[name]} | {m:.3f} | {m / base:.3f} | {' '.join('%.2f' % x for x in v)} |")
PY
rm -f "$results"
