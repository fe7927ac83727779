#!/usr/bin/env bash
# B4: data path throughput, inside one user-mode-linux boot (ESP kernel).
#
#   scripts/bench-datapath.sh [--bin PATH] [--reps R] [--secs S] [--mem 1024M]
#
# Two pairs of namespaces, each pair joined by one veth (192.0.2.1 <-> 192.0.2.2, MTU
# 1500). One iperf3 TCP stream, S seconds (plus 1 s omitted for slow start), from the
# first namespace of a pair to the second, over:
#   underlay   the veth itself (pair 1);
#   plain      a plaintext network made by `ovl-controller apply -f` (no agent) (pair 1);
#   encrypted  an encrypted network made by ovl-controller agents (pair 1);
#   by hand    the same ESP made with `ip xfrm` on a hand-made vxlan + bridge (pair 2):
#              rfc4106(gcm(aes)) with a 36-byte key and 128-bit ICV, transport mode, ESN,
#              replay window 1024, the same selectors, the same four policies (per-pair
#              out/in, catch-all in requiring ESP, catch-all out block), VXLAN on port
#              4790 with the same options, and the MTU the controller chose.
# R repetitions. The runs that are compared go back to back (underlay and plain, then
# encrypted and by hand), which one first alternating between repetitions: the
# throughput of the fast paths drifts with the shared host's load over tens of seconds,
# so besides the ratio of the medians, the median of the per-repetition ratios of
# neighbouring runs is reported (the steadier estimate).
# Fragmentation is checked with the kernel's counters on both ends of every run
# (IpFragCreates on the sender, IpReasmReqds on the receiver, from nstat), and the XFRM
# error counters (/proc/net/xfrm_stat) are reported when not zero.
#
# UML has one CPU: the iperf3 client, the server and all the kernel's work (VXLAN, ESP
# with software AES-GCM) share it. Absolute numbers are not those of real hardware;
# the ratios, measured in the same boot, are the result.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench/lib.sh
source "$here/bench/lib.sh"

reps=9
secs=5
mem=1024M
bin=$bench_repo/target/release/ovl-controller
inside=
while (($#)); do
    case $1 in
    --reps) reps=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    *) bench_common_arg "$@"; shift "$BENCH_SHIFT" ;;
    esac
done
command -v iperf3 >/dev/null || bench_die "iperf3 not found (apt-get install iperf3)"

if [[ -z $inside ]]; then
    bench_host_prepare datapath "$bin" "$mem"
    bench_host_boot "$mem" 1800 "$here/bench-datapath.sh" --reps "$reps" --secs "$secs"
    exit
fi

# ---- inside the guest -------------------------------------------------------------------
bench_guest_init "$inside"
A=192.0.2.1
B=192.0.2.2
PORT=4790

# Two pairs, each joined by a veth with A and B on it.
bench_pair da db
bench_pair dc dd

# --- pair 1: ovl-controller ---
ka=$(bench_keygen "$BENCH_RUN/a")
kb=$(bench_keygen "$BENCH_RUN/b")
nodes=$(printf '  - name: a\n    address: %s\n    publicKey: "%s"\n  - name: b\n    address: %s\n    publicKey: "%s"\n' $A "$ka" $B "$kb")
plain_net='  - name: plain
    vni: 100
    addresses: {a: 10.1.0.1/24, b: 10.1.0.2/24}'
sec_net='  - name: sec
    vni: 300
    encrypted: true
    addresses: {a: 10.3.0.1/24, b: 10.3.0.2/24}'
printf 'apiVersion: ovl/v1\ncluster:\n  name: bench\nnodes:\n%s\nnetworks:\n%s\n' "$nodes" "$plain_net" >"$BENCH_RUN/plain.yaml"
printf 'apiVersion: ovl/v1\ncluster:\n  name: bench\nnodes:\n%s\nnetworks:\n%s\n%s\n' "$nodes" "$plain_net" "$sec_net" >"$BENCH_RUN/all.yaml"

# (ii) plaintext network: apply -f, no agent running.
bench_ctl da a apply -f "$BENCH_RUN/plain.yaml" >/dev/null
bench_ctl db b apply -f "$BENCH_RUN/plain.yaml" >/dev/null
# (iii) encrypted network: agents (the plaintext network is unchanged by them).
bench_start_agent da a "$BENCH_RUN/all.yaml" info
bench_start_agent db b "$BENCH_RUN/all.yaml" info
bench_ctl da a apply -f "$BENCH_RUN/all.yaml" >/dev/null
bench_ctl db b apply -f "$BENCH_RUN/all.yaml" >/dev/null
for i in $(seq 1 120); do
    bench_peers_keyed da a 1 && bench_peers_keyed db b 1 && break
    ((i < 120)) || bench_die "the agents did not key the pair within 60 s"
    sleep 0.5
done
mtu=$(ip -n da -j link show ovbr-300 | jq -r '.[0].mtu')
plain_mtu=$(ip -n da -j link show ovbr-100 | jq -r '.[0].mtu')
# What the kernel holds, keys redacted, for the comparison with the hand-made setup.
snapshot() { # NS VXLAN PREFIX
    ip -n "$1" -d link show "$2" >"$BENCH_WORK/$3-vxlan.txt"
    ip -n "$1" xfrm policy >"$BENCH_WORK/$3-policies.txt"
    ip -n "$1" -s xfrm state | sed -E 's/0x[0-9a-f]{72}/<key>/' >"$BENCH_WORK/$3-states.txt"
}
# The same objects with what must differ (SPIs, reqids, counters, times) taken out.
normalize() { # PREFIX
    {
        grep -o 'vxlan id.*' "$BENCH_WORK/$1-vxlan.txt"
        grep -oE '(^| )mtu [0-9]+' "$BENCH_WORK/$1-vxlan.txt"
        sed -E 's/reqid [0-9]+//' "$BENCH_WORK/$1-policies.txt" | tr -s ' \t' ' '
        sed -E '/lifetime current/,/replay-window [0-9]+ replay/d; /anti-replay esn context/,/replay_window/{/replay_window/!d}; /^\s*[0-9a-f]{8} /d' \
            "$BENCH_WORK/$1-states.txt" | sed -E 's/spi 0x[0-9a-f]+\([0-9]+\)//; s/reqid [0-9]+\(0x[0-9a-f]+\)//; s/ uid 0//' | tr -s ' \t' ' '
    } >"$BENCH_WORK/$1-normalized.txt"
}
snapshot da ovvx-300 ovl

# --- pair 2: the same ESP by hand ---
hand_node() { # NS ME PEER MYADDR SPI_OUT SPI_IN KEY_OUT KEY_IN
    local ns=$1 me=$2 peer=$3 addr=$4 spi_out=$5 spi_in=$6 key_out=$7 key_in=$8
    local lim='limit byte-soft 1099511627776 limit byte-hard 4398046511104 limit packet-soft 2147483648 limit packet-hard 8589934592'
    # Policies first (fail closed), as the controller orders them.
    ip -n "$ns" xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 proto udp dport $PORT dir out action block priority 2000 \
        tmpl proto esp reqid 1 mode transport
    ip -n "$ns" xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 proto udp dport $PORT dir in priority 2000 \
        tmpl proto esp reqid 1 mode transport
    ip -n "$ns" xfrm policy add src "$peer/32" dst "$me/32" proto udp dport $PORT dir in priority 1000 \
        tmpl src "$peer" dst "$me" proto esp reqid 1 mode transport
    ip -n "$ns" xfrm policy add src "$me/32" dst "$peer/32" proto udp dport $PORT dir out priority 1000 \
        tmpl src "$me" dst "$peer" proto esp reqid 1 mode transport
    # shellcheck disable=SC2086
    ip -n "$ns" xfrm state add src "$peer" dst "$me" proto esp spi "$spi_in" reqid 1 mode transport \
        replay-window 1024 flag esn aead 'rfc4106(gcm(aes))' "0x$key_in" 128 \
        sel src "$peer/32" dst "$me/32" proto udp dport $PORT $lim
    # shellcheck disable=SC2086
    ip -n "$ns" xfrm state add src "$me" dst "$peer" proto esp spi "$spi_out" reqid 1 mode transport \
        replay-window 1024 flag esn aead 'rfc4106(gcm(aes))' "0x$key_out" 128 \
        sel src "$me/32" dst "$peer/32" proto udp dport $PORT $lim
    ip -n "$ns" link add hbr300 mtu "$mtu" type bridge
    ip -n "$ns" link add hvx300 mtu "$mtu" type vxlan id 300 local "$me" dev eth0 dstport $PORT udpcsum learning
    ip -n "$ns" link set hvx300 master hbr300
    ip -n "$ns" addr add "$addr" dev hbr300
    bridge -n "$ns" fdb append 00:00:00:00:00:00 dev hvx300 dst "$peer"
    ip -n "$ns" link set hvx300 up
    ip -n "$ns" link set hbr300 up
}
key() { head -c36 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
k_cd=$(key)
k_dc=$(key)
hand_node dc $A $B 10.3.0.1/24 0x1001 0x1002 "$k_cd" "$k_dc"
hand_node dd $B $A 10.3.0.2/24 0x1002 0x1001 "$k_dc" "$k_cd"
k_cd=
k_dc=
snapshot dc hvx300 hand
normalize ovl
normalize hand
if same_setup=$(diff "$BENCH_WORK/ovl-normalized.txt" "$BENCH_WORK/hand-normalized.txt"); then
    same_setup="identical"
fi

# Both overlays work before anything is measured.
for x in "da 10.1.0.2" "da 10.3.0.2" "dc 10.3.0.2"; do
    set -- $x
    ip netns exec "$1" ping -c 3 -i 0.2 -w 6 -q "$2" >/dev/null || bench_die "$1 cannot ping $2"
done

# iperf3 servers (one per pair; each serves every run on its pair).
for ns in db dd; do
    ip netns exec "$ns" iperf3 -s >"$BENCH_RUN/iperf3-$ns.log" 2>&1 &
    BENCH_PIDS+=($!)
done
sleep 1

frag() { # NS: "IpFragCreates IpReasmReqds" absolute
    ip netns exec "$1" nstat -asz IpFragCreates IpReasmReqds | awk '
        $1 == "IpFragCreates" { c = $2 } $1 == "IpReasmReqds" { r = $2 } END { print c + 0, r + 0 }'
}

xfrm_stat() { # NS: NAME=VALUE for every counter of /proc/net/xfrm_stat
    ip netns exec "$1" awk '{ printf "%s=%s ", $1, $2 }' /proc/net/xfrm_stat
}
declare -A XS0
for ns in da db dc dd; do XS0[$ns]=$(xfrm_stat "$ns"); done

declare -A CL SRV DST
CL[underlay]=da SRV[underlay]=db DST[underlay]=$B
CL[plain]=da SRV[plain]=db DST[plain]=10.1.0.2
CL[encrypted]=da SRV[encrypted]=db DST[encrypted]=10.3.0.2
CL[hand]=dc SRV[hand]=dd DST[hand]=10.3.0.2
configs=(underlay plain encrypted hand)
declare -A RES RETR FRAG
for c in "${configs[@]}"; do RES[$c]="" RETR[$c]="" FRAG[$c]="0 0"; done

for ((r = 0; r < reps; r++)); do
    if ((r % 2 == 0)); then order=(underlay plain encrypted hand); else order=(plain underlay hand encrypted); fi
    for c in "${order[@]}"; do
        read -r fc0 _ <<<"$(frag "${CL[$c]}")"
        read -r _ rr0 <<<"$(frag "${SRV[$c]}")"
        out=$(timeout $((secs + 30)) ip netns exec "${CL[$c]}" iperf3 -c "${DST[$c]}" -t "$secs" -O 1 -J) ||
            bench_die "iperf3 $c failed: $(jq -r '.error // empty' <<<"$out" 2>/dev/null)"
        read -r fc1 _ <<<"$(frag "${CL[$c]}")"
        read -r _ rr1 <<<"$(frag "${SRV[$c]}")"
        gbps=$(jq -r '.end.sum_received.bits_per_second / 1e9' <<<"$out")
        retr=$(jq -r '.end.sum_sent.retransmits' <<<"$out")
        RES[$c]+="$gbps "
        RETR[$c]+="$retr "
        read -r f1 f2 <<<"${FRAG[$c]}"
        FRAG[$c]="$((f1 + fc1 - fc0)) $((f2 + rr1 - rr0))"
        bench_log "rep $((r + 1)) $c: $(printf '%.3f' "$gbps") Gbit/s, $retr retransmits, fragments created $((fc1 - fc0)), reassembly requests $((rr1 - rr0))"
    done
done

med() { bench_median $1; }
declare -A MED
for c in "${configs[@]}"; do MED[$c]=$(med "${RES[$c]}"); done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t) ? "met" : "MISSED" }'; }
r_plain=$(ratio "${MED[plain]}" "${MED[underlay]}")
r_enc=$(ratio "${MED[encrypted]}" "${MED[hand]}")
r_enc_plain=$(ratio "${MED[encrypted]}" "${MED[plain]}")
# Paired: the ratio within each repetition (the two runs went back to back), then the
# median of those; less sensitive to slow drifts of the host's load.
paired() { # A B: median over repetitions of A[r] / B[r]
    local -a a b q
    read -r -a a <<<"${RES[$1]}"
    read -r -a b <<<"${RES[$2]}"
    for ((r = 0; r < ${#a[@]}; r++)); do q+=("$(ratio "${a[r]}" "${b[r]}")"); done
    echo "$(bench_median "${q[@]}") (per repetition: ${q[*]})"
}
p_plain=$(paired plain underlay)
p_enc=$(paired encrypted hand)
declare -A LABEL MTU
LABEL[underlay]="underlay veth"
LABEL[plain]="plain overlay (ovl-controller apply)"
LABEL[encrypted]="encrypted overlay (ovl-controller agents)"
LABEL[hand]="same ESP by hand (ip xfrm, vxlan, bridge)"
MTU[underlay]=1500 MTU[plain]=$plain_mtu MTU[encrypted]=$mtu MTU[hand]=$mtu
{
    echo "| path | MTU | Gbit/s, median of $reps | every run (Gbit/s) | retransmits per run | fragments created / reassembly requests (all runs) |"
    echo "|---|---:|---:|---|---|---:|"
    for c in "${configs[@]}"; do
        runs=$(for x in ${RES[$c]}; do printf '%.2f ' "$x"; done)
        read -r f1 f2 <<<"${FRAG[$c]}"
        echo "| ${LABEL[$c]} | ${MTU[$c]} | $(printf '%.3f' "${MED[$c]}") | ${runs% } | ${RETR[$c]% } | $f1 / $f2 |"
    done
    echo
    echo "- plain / underlay = **$r_plain** (target >= 0.95: $(verdict "$r_plain" 0.95))"
    echo "- encrypted / by hand = **$r_enc** (target >= 0.95: $(verdict "$r_enc" 0.95))"
    echo "- paired (median of the per-repetition ratios): plain / underlay = $p_plain; encrypted / by hand = $p_enc"
    echo "- encrypted / plain = $r_enc_plain (the cost of software AES-GCM in UML)"
    for ns in da db dc dd; do
        e=$(awk -v before="${XS0[$ns]}" -v after="$(xfrm_stat "$ns")" 'BEGIN {
            n = split(before, b, " "); for (i = 1; i <= n; i++) { split(b[i], kv, "="); v[kv[1]] = kv[2] }
            n = split(after, a, " "); for (i = 1; i <= n; i++) { split(a[i], kv, "="); if (kv[2] - v[kv[1]] != 0) printf "%s +%d ", kv[1], kv[2] - v[kv[1]] } }')
        echo "- XFRM error counters (/proc/net/xfrm_stat) in $ns during the runs: ${e:-all unchanged}"
    done
    echo "- kernel objects of the encrypted overlay vs the hand-made one (VXLAN options, MTU, policies, SA parameters; SPIs, reqids, keys and counters aside): $same_setup"
    errs=$(grep -hE ' (WARN|ERROR) ' "$BENCH_RUN"/a/agent.log "$BENCH_RUN"/b/agent.log || true)
    [[ -z $errs ]] || { echo "- agent WARN/ERROR lines:"; echo '```'; echo "$errs" | head -n 20; echo '```'; }
} >"$BENCH_WORK/result.md"
bench_save_logs
cat "$BENCH_WORK/result.md"
