#!/usr/bin/env bash
# The project's whole test suite; the README's test command and what CI runs.
#   1. unit, property and doc tests (no root needed);
#   2. integration tests on this machine's kernel, in network namespaces (root);
#   3. integration tests that need ESP, inside user-mode-linux (root, no KVM needed).
# Every step must pass; nothing is skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: needs root (network namespaces, XFRM); run it as root" >&2
  exit 2
fi
for tool in ip bridge ping tcpdump linux.uml; do
  command -v "$tool" >/dev/null || { echo "scripts/test.sh: missing $tool (see .ci/run for the packages)" >&2; exit 2; }
done

export RUST_BACKTRACE=1
echo "== build"
cargo build --all-targets --quiet

echo "== unit, property and doc tests"
cargo test --quiet --lib --bins
cargo test --quiet --doc

echo "== integration tests on the host kernel"
for t in invalid_specs plaintext kernel_links host_kernel; do
  if [ -f "integration/$t.rs" ]; then
    cargo test --quiet --test "$t"
  fi
done

echo "== integration tests inside user-mode-linux (ESP)"
# Test binaries built above; run each inside one UML boot.
mapfile -t uml_bins < <(cargo test --no-run --message-format=json --test encrypted --test kernel_xfrm --test agents --test kernel_batch --test rotation 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["executable"])')
if [ "${#uml_bins[@]}" = 0 ]; then
  echo "scripts/test.sh: no ESP test binaries found" >&2
  exit 1
fi
for bin in "${uml_bins[@]}"; do
  echo "-- $(basename "$bin") (in UML)"
  scripts/uml-run.sh --timeout 1500 -- "$bin" --test-threads=1
done
echo "== all tests passed"
