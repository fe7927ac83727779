#!/usr/bin/env bash
# A three-node demo cluster in network namespaces, driven by the real binary: node keys
# (keygen), validate, one agent per node (keys agreed over Noise sessions), plan (dry
# run), apply on every node, traffic over the plaintext and the encrypted networks (the
# underlay captured: only ESP for the encrypted one), a no-op second apply, a key
# rotation as cron would run it, status and the kernel's view.
# Runs inside user-mode-linux when the host kernel lacks ESP. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then echo "demo: run as root" >&2; exit 2; fi
if [ "${1:-}" != --here ]; then
  cargo build --quiet
  probe=ovldemo-probe-$$
  ip netns add "$probe"
  if ip -n "$probe" xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x42 mode transport \
      aead 'rfc4106(gcm(aes))' "0x$(printf '11%.0s' $(seq 36))" 128 2>/dev/null; then
    ip netns del "$probe"; exec "$0" --here
  fi
  ip netns del "$probe"
  echo "== this kernel has no ESP: running the demo inside user-mode-linux"
  exec scripts/uml-run.sh --quiet -- "$PWD/scripts/demo.sh" --here
fi

BIN=$PWD/target/debug/ovl-controller
work=$(mktemp -d /tmp/ovl-demo.XXXXXX)
nodes=(a b c)
cleanup() {
  for n in "${nodes[@]}"; do
    ip netns pids "demo-$n" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "demo-$n" 2>/dev/null || true
  done
  ip netns pids demo-sw 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del demo-sw 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cleanup; mkdir -p "$work"

# Every command of node X runs in its namespace with its own key, state and socket.
ctl() { local n=$1; shift; ip netns exec "demo-$n" "$BIN" "$@" --node "node-$n" \
  --key "$work/$n/node.key" --state-dir "$work/$n/state" --socket "$work/$n/agent.sock"; }

echo "== underlay: three namespaces on one switch (192.0.2.0/24)"
ip netns add demo-sw
ip -n demo-sw link add ub0 type bridge && ip -n demo-sw link set ub0 up
i=0
for n in "${nodes[@]}"; do
  i=$((i + 1))
  ip netns add "demo-$n"
  ip -n "demo-$n" link add eth0 type veth peer name "p$n" netns demo-sw
  ip -n demo-sw link set "p$n" master ub0 up
  ip -n "demo-$n" addr add "192.0.2.$i/24" dev eth0
  ip -n "demo-$n" link set eth0 up
  ip -n "demo-$n" link set lo up
done

echo "== node identities (ovl-controller keygen: private key 0600, public key printed)"
declare -A pub
for n in "${nodes[@]}"; do
  mkdir -p "$work/$n"
  pub[$n]=$("$BIN" keygen --out "$work/$n/node.key")
  echo "   node-$n ${pub[$n]}"
done

cat > "$work/networks.yaml" <<YAML
apiVersion: ovl/v1
cluster:
  name: demo
  rotation: 1h
nodes:
  - {name: node-a, address: 192.0.2.1, publicKey: "${pub[a]}"}
  - {name: node-b, address: 192.0.2.2, publicKey: "${pub[b]}"}
  - {name: node-c, address: 192.0.2.3, publicKey: "${pub[c]}"}
networks:
  - name: secret
    vni: 300
    encrypted: true
    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24, node-c: 10.3.0.3/24}
  - name: blue
    vni: 100
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24, node-c: 10.1.0.3/24}
  - name: red
    vni: 200
    nodes: [node-a, node-b]
    addresses: {node-a: 10.2.0.1/24, node-b: 10.2.0.2/24}
YAML
echo "== spec"; cat "$work/networks.yaml"
echo "== validate"; "$BIN" validate -f "$work/networks.yaml"

echo "== agents (one per node; they agree the ESP keys over Noise sessions)"
for n in "${nodes[@]}"; do
  ctl "$n" agent -f "$work/networks.yaml" --log-level info >"$work/$n/agent.log" 2>&1 &
done
for n in "${nodes[@]}"; do
  for _ in $(seq 100); do [ -S "$work/$n/agent.sock" ] && break; sleep 0.1; done
done

echo "== plan for node-a (dry run)"
ctl a apply -f "$work/networks.yaml" --dry-run
for n in "${nodes[@]}"; do
  echo "== apply on node-$n"
  ctl "$n" apply -f "$work/networks.yaml" >/dev/null && echo "   done"
done

echo "== traffic (the underlay is captured meanwhile)"
ip netns exec demo-sw tcpdump -i ub0 -n -c 400 -w "$work/underlay.pcap" 'udp or esp' >/dev/null 2>&1 &
sleep 1
for pair in "a 10.3.0.2" "a 10.3.0.3" "b 10.3.0.3" "c 10.3.0.1" "a 10.1.0.2" "b 10.1.0.3" "a 10.2.0.2"; do
  set -- $pair
  ok=0
  for _ in $(seq 50); do
    if ip netns exec "demo-$1" ping -c 2 -i 0.2 -W 1 -q "$2" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  if [ $ok = 1 ]; then echo "   node-$1 -> $2: ok"; else echo "   node-$1 -> $2: FAILED"; exit 1; fi
done
sleep 1; kill %2 2>/dev/null || true; wait %2 2>/dev/null || true
echo "   on the wire: $(tcpdump -r "$work/underlay.pcap" -n esp 2>/dev/null | wc -l) ESP packets," \
     "$(tcpdump -r "$work/underlay.pcap" -n 'udp port 4789' 2>/dev/null | wc -l) plaintext VXLAN (blue, red)," \
     "$(tcpdump -r "$work/underlay.pcap" -n 'udp port 4790' 2>/dev/null | wc -l) plaintext packets of the encrypted network"

echo "== second apply on node-a: nothing to do"
ctl a apply -f "$work/networks.yaml"
echo "== rotate the keys of node-a (as cron would)"
ctl a rotate
echo "== status on node-a"
ctl a status
echo "== the kernel's view on node-a"
ip -n demo-a xfrm policy | grep -E '^src|action' | head -8
echo "== demo done"
