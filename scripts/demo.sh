#!/usr/bin/env bash
# A three-node demo cluster in network namespaces, driven by the real binary:
# validate, plan (dry run), apply on every node, traffic across both plaintext
# networks, a no-op second apply, status. The spec also has an encrypted network: on a
# kernel without ESP it is refused (fail closed) with the reason; with ESP but no agent
# it is refused with "start the agent" (agents and key agreement are the next milestone).
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
  for n in "${nodes[@]}"; do ip netns del "demo-$n" 2>/dev/null || true; done
  ip netns del demo-sw 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cleanup; mkdir -p "$work"

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

key() { printf '%032d' "$1" | head -c 32 | base64; }
cat > "$work/networks.yaml" <<YAML
apiVersion: ovl/v1
cluster:
  name: demo
nodes:
  - {name: node-a, address: 192.0.2.1, publicKey: "$(key 1)"}
  - {name: node-b, address: 192.0.2.2, publicKey: "$(key 2)"}
  - {name: node-c, address: 192.0.2.3, publicKey: "$(key 3)"}
networks:
  - name: blue
    vni: 100
    addresses: {node-a: 10.1.0.1/24, node-b: 10.1.0.2/24, node-c: 10.1.0.3/24}
  - name: red
    vni: 200
    nodes: [node-a, node-b]
    addresses: {node-a: 10.2.0.1/24, node-b: 10.2.0.2/24}
  - name: secret
    vni: 300
    encrypted: true
    addresses: {node-a: 10.3.0.1/24, node-b: 10.3.0.2/24, node-c: 10.3.0.3/24}
YAML
echo "== spec"; cat "$work/networks.yaml"
echo "== validate"; "$BIN" validate -f "$work/networks.yaml"
echo "== plan for node-a (dry run)"
ip netns exec demo-a "$BIN" apply -f "$work/networks.yaml" --dry-run || true
for n in "${nodes[@]}"; do
  echo "== apply on node-$n (node found by its local address)"
  ip netns exec "demo-$n" "$BIN" apply -f "$work/networks.yaml" && rc=0 || rc=$?
  echo "   exit code $rc"
done
echo "== traffic"
for pair in "a 10.1.0.2" "a 10.1.0.3" "b 10.1.0.3" "c 10.1.0.1" "a 10.2.0.2" "b 10.2.0.1"; do
  set -- $pair
  if ip netns exec "demo-$1" ping -c 2 -i 0.2 -W 2 -q "$2" >/dev/null; then
    echo "   node-$1 -> $2: ok"
  else
    echo "   node-$1 -> $2: FAILED"; exit 1
  fi
done
echo "== second apply on node-a: nothing to do"
ip netns exec demo-a "$BIN" apply -f "$work/networks.yaml" || true
echo "== status on node-a"
ip netns exec demo-a "$BIN" status
echo "== kernel view on node-a"
ip -n demo-a -d link show ovvx-100 | head -3
bridge -n demo-a fdb show dev ovvx-100 | grep 00:00:00:00:00:00
echo "== demo done"
