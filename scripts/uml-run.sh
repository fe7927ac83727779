#!/usr/bin/env bash
# Run one command inside a user-mode-linux guest: an ESP-capable Linux 6.1 kernel that
# runs as an ordinary process, with the host's file system as its root (hostfs).
#
#   scripts/uml-run.sh [options] -- COMMAND [ARGS...]
#
# Options:
#   --mem SIZE        guest memory (default 1024M)
#   --timeout SECS    kill the guest after SECS seconds (default 900)
#   --env NAME[=VAL]  also pass NAME into the guest (repeatable)
#   --module NAME     also load kernel module NAME (repeatable)
#   --kernel-log      show every kernel message on the console (default: errors only)
#   --keep            keep the work dir (init script, console log, dmesg)
#   --quiet           no timing summary on stderr
#
# The guest: /proc, /sys, devtmpfs /dev, tmpfs /run (+ /run/netns), /dev/pts, /dev/shm;
# /tmp and everything else is the host's (shared, so results can be left there);
# the modules esp4 esp6 xfrm_user xfrm_algo vxlan veth bridge and the AES-GCM pieces
# loaded; the kernel's on-demand module loader pointed at the UML module tree; the
# rfc4106(gcm(aes)) crypto warmed up (its self-tests cost ~1-3 s on first use). The
# command runs as root in the caller's working directory with stdin from /dev/null,
# PATH, HOME, RUST_LOG, RUST_BACKTRACE, RUST_LIB_BACKTRACE, RUST_TEST_*, CI, NO_COLOR,
# CARGO_*, every OVL_* variable and OVL_IN_UML=1. Its stdout and stderr stream to this
# script's stdout (both through the guest console, so they are merged); they are a
# terminal in the guest only when this script's stdout is one.
#
# Exit status: the command's; 124 if the timeout elapsed; 125 if the harness itself
# failed (UML missing or did not boot, a module did not load, the crypto warm-up
# failed, the guest reported no status). Harness messages go to stderr, prefixed
# "uml-run:".
#
# Works with stdin closed (CI) and as root; several runs can go on at once (each has its
# own work dir under /tmp).
set -euo pipefail

prog=uml-run
die() { # status message...
    local rc=$1
    shift
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit "$rc"
}
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 125
}

mem=1024M
timeout=900
kernel_log=0
keep=0
quiet=0
extra_env=()
extra_modules=()
while (($#)); do
    case $1 in
    --mem) mem=${2:?--mem needs a size}; shift 2 ;;
    --mem=*) mem=${1#*=}; shift ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --timeout=*) timeout=${1#*=}; shift ;;
    --env) extra_env+=("${2:?--env needs NAME[=VALUE]}"); shift 2 ;;
    --env=*) extra_env+=("${1#*=}"); shift ;;
    --module) extra_modules+=("${2:?--module needs a name}"); shift 2 ;;
    --module=*) extra_modules+=("${1#*=}"); shift ;;
    --kernel-log) kernel_log=1; shift ;;
    --keep) keep=1; shift ;;
    --quiet) quiet=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) printf '%s: error: unexpected argument %q (the command goes after --)\n' "$prog" "$1" >&2; usage ;;
    esac
done
(($#)) || { printf '%s: error: no command given\n' "$prog" >&2; usage; }
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die 125 "--timeout must be a positive number of seconds, not '$timeout'"
[[ $mem =~ ^[1-9][0-9]*[KMG]?$ ]] || die 125 "--mem must look like 1024M, not '$mem'"

uml=${OVL_UML_KERNEL:-/usr/bin/linux.uml}
[[ -x $uml ]] || die 125 "$uml not found: install Debian's user-mode-linux package (apt-get install user-mode-linux)"
kver=$("$uml" --version 2>/dev/null | head -n1 || true)
moddir=/usr/lib/uml/modules/$kver
[[ -n $kver && -d $moddir ]] || die 125 "no UML module tree for kernel '$kver' under /usr/lib/uml/modules"
[[ -x /usr/sbin/modprobe ]] || die 125 "/usr/sbin/modprobe not found (apt-get install kmod)"
command -v ip >/dev/null || die 125 "ip not found (apt-get install iproute2)"

work=$(mktemp -d /tmp/ovl-uml.XXXXXXXX)
token=${work##*.}$RANDOM$RANDOM
start_marker="@@ovl-uml-start-$token@@"
end_marker="@@ovl-uml-end-$token@@"
uml_pid=
filter_pid=
sleep_pid=

cleanup() {
    local rc=$?
    [[ -n $sleep_pid ]] && kill "$sleep_pid" 2>/dev/null
    if [[ -n $uml_pid ]] && kill -0 "$uml_pid" 2>/dev/null; then
        kill -KILL -- "-$uml_pid" 2>/dev/null || kill -KILL "$uml_pid" 2>/dev/null
    fi
    if ((keep)) || ((rc == 124 || rc == 125)); then
        printf '%s: work dir kept: %s\n' "$prog" "$work" >&2
    else
        rm -rf -- "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- guest side -----------------------------------------------------------------------

# The module tree in the layout `modprobe -d` expects, and a modprobe the guest kernel
# can call for on-demand loads (an AEAD asked for by an SA, a netns's modules...).
mkdir -p "$work/modroot/lib"
ln -s /usr/lib/uml/modules "$work/modroot/lib/modules"
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d %q "$@"\n' "$work/modroot" >"$work/modprobe"
chmod +x "$work/modprobe"

modules=(xfrm_algo xfrm_user esp4 esp6 vxlan veth bridge gcm ghash-generic ctr seqiv echainiv authenc
    "${extra_modules[@]}")

env_lines=()
add_env() { # NAME VALUE
    [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die 125 "bad environment variable name '$1'"
    env_lines+=("export $1=$(printf %q "$2")")
}
add_env PATH "$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
add_env HOME "${HOME:-/root}"
while IFS= read -r name; do
    case $name in
    RUST_LOG | RUST_BACKTRACE | RUST_LIB_BACKTRACE | RUST_TEST_* | CI | NO_COLOR | CARGO_* | OVL_* | LANG | LC_ALL | TZ)
        add_env "$name" "${!name}" ;;
    esac
done < <(compgen -e)
for e in "${extra_env[@]}"; do
    if [[ $e == *=* ]]; then
        add_env "${e%%=*}" "${e#*=}"
    elif [[ -v $e ]]; then
        add_env "$e" "${!e}"
    fi
done
add_env OVL_IN_UML 1

tty_out=0
[[ -t 1 ]] && tty_out=1
{
    printf '#!/bin/bash\n'
    printf '# PID 1 of a UML guest, generated by scripts/uml-run.sh.\n'
    printf 'work=%q\n' "$work"
    printf 'start_marker=%q\nend_marker=%q\n' "$start_marker" "$end_marker"
    printf 'kernel_log=%d\n' "$kernel_log"
    # The command sees a terminal only when our caller has one (no colour codes in CI logs).
    printf 'tty_out=%d\n' "$tty_out"
    printf 'modules=(%s)\n' "$(printf '%q ' "${modules[@]}")"
    printf 'cwd=%q\n' "$PWD"
    printf 'cmd=(%s)\n' "$(printf '%q ' "$@")"
    printf 'setup_env() {\n'
    printf '    %s\n' "${env_lines[@]}"
    printf '}\n'
    cat <<'INIT'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
now() { local up; read -r up _ </proc/uptime; echo "$up"; }
halt_guest() {
    sync
    poweroff -ff >/dev/null 2>&1
    echo o >/proc/sysrq-trigger
    sleep 5
}
fail() { # the harness failed inside the guest: say why, record it, halt
    echo "uml-run: guest: $*" >&2
    echo "$end_marker"
    echo "$*" >"$work/init-error"
    dmesg >"$work/dmesg" 2>/dev/null
    halt_guest
}
mount -t proc proc /proc || fail "cannot mount /proc"
((kernel_log)) || echo 4 >/proc/sys/kernel/printk
stty -onlcr 2>/dev/null
echo "$start_marker"
mount -t sysfs sys /sys || fail "cannot mount /sys"
mountpoint -q /dev || mount -t devtmpfs dev /dev || fail "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts || fail "cannot mount /dev/pts"
mount -t tmpfs shm /dev/shm || fail "cannot mount /dev/shm"
mount -t tmpfs -o mode=755 run /run || fail "cannot mount /run"
mkdir -p /run/netns /run/lock
[[ -c /dev/null && -c /dev/urandom ]] || fail "/dev/null or /dev/urandom missing"
echo "$work/modprobe" >/proc/sys/kernel/modprobe || fail "cannot set /proc/sys/kernel/modprobe"
if ! "$work/modprobe" -a "${modules[@]}" 2>/dev/null; then # one process: exec is slow in UML
    for m in "${modules[@]}"; do
        out=$("$work/modprobe" "$m" 2>&1) || fail "cannot load kernel module $m: $out"
    done
fi
ip link set lo up
hostname ovl-uml 2>/dev/null

# Warm the AEAD up: the first rfc4106(gcm(aes)) SA after boot runs the crypto self-tests.
warm=ovl-uml-warmup
t0=$(now)
key=$(head -c36 /dev/urandom | od -An -tx1 | tr -d ' \n')
ip netns add "$warm" || fail "cannot create a network namespace"
out=$(ip -n "$warm" xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 mode transport \
    aead 'rfc4106(gcm(aes))' "0x$key" 128 2>&1) || fail "crypto warm-up: cannot add an ESP AES-GCM SA: $out"
key=
ip -n "$warm" xfrm state flush
ip netns del "$warm"
t1=$(now)

cd "$cwd" || fail "cannot cd to $cwd"
if ((tty_out)); then
    (
        setup_env
        exec "${cmd[@]}"
    ) </dev/null
    rc=$?
else
    (
        setup_env
        exec "${cmd[@]}"
    ) </dev/null 2>&1 | cat
    rc=${PIPESTATUS[0]}
fi
t2=$(now)
echo "$end_marker"
echo "$t0 $t1 $t2" >"$work/times"
dmesg >"$work/dmesg" 2>/dev/null
echo "$rc" >"$work/status.tmp" && mv "$work/status.tmp" "$work/status"
halt_guest
INIT
} >"$work/init"
chmod +x "$work/init"

# --- host side ------------------------------------------------------------------------

ulimit -c 0 # UML dumps core on a guest panic
mkfifo "$work/console"
# Show the console between the markers; keep all of it in console.log.
awk -W interactive -v start="$start_marker" -v end="$end_marker" -v logfile="$work/console.log" '
    { sub(/\r$/, ""); print > logfile; fflush(logfile) }
    $0 == start { on = 1; next }
    on && (i = index($0, end)) > 0 {
        # the command left a partial line before the end marker
        on = 0
        if (i > 1) { print substr($0, 1, i - 1); fflush() }
        next
    }
    on { print; fflush() }
' <"$work/console" &
filter_pid=$!

t_start=$(date +%s.%N)
setsid "$uml" "mem=$mem" rootfstype=hostfs rootflags=/ rw "init=$work/init" \
    con=null con0=null,fd:1 ssl=null quiet </dev/null >"$work/console" 2>&1 &
uml_pid=$!
sleep "$timeout" </dev/null >/dev/null 2>&1 &
sleep_pid=$!

finished=
wait -n -p finished "$uml_pid" "$sleep_pid" || true
timed_out=0
if [[ $finished == "$sleep_pid" ]]; then
    timed_out=1
    sleep_pid=
    kill -TERM -- "-$uml_pid" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$uml_pid" 2>/dev/null || true
    wait "$uml_pid" 2>/dev/null || true
else
    kill "$sleep_pid" 2>/dev/null || true
    wait "$sleep_pid" 2>/dev/null || true
    sleep_pid=
fi
uml_pid=
wait "$filter_pid" 2>/dev/null || true
t_end=$(date +%s.%N)

show_log_tail() {
    if [[ -s $work/console.log ]]; then
        printf '%s: last console lines:\n' "$prog" >&2
        tail -n 30 "$work/console.log" | sed 's/^/  | /' >&2
    fi
}

if ((timed_out)); then
    show_log_tail
    die 124 "timeout: the guest ran longer than ${timeout}s and was killed"
fi
if [[ -f $work/init-error ]]; then
    die 125 "guest setup failed: $(cat "$work/init-error")"
fi
if ! grep -qxF "$start_marker" "$work/console.log" 2>/dev/null; then
    show_log_tail
    die 125 "UML did not boot (no output from the guest init); console log: $work/console.log"
fi
if [[ ! -f $work/status ]]; then
    show_log_tail
    die 125 "the guest reported no exit status (kernel panic or crash?); console log: $work/console.log"
fi
status=$(cat "$work/status")
[[ $status =~ ^[0-9]+$ ]] || die 125 "unreadable guest exit status '$status'"

if ((!quiet)); then
    read -r g0 g1 g2 <"$work/times" || true
    awk -v a="$t_start" -v b="$t_end" -v g0="${g0:-0}" -v g1="${g1:-0}" -v g2="${g2:-0}" -v rc="$status" -v p="$prog" 'BEGIN {
        printf "%s: guest exit status %d (boot %.1fs, crypto warm-up %.1fs, command %.1fs, total %.1fs)\n",
            p, rc, g0, g1 - g0, g2 - g1, b - a > "/dev/stderr" }'
fi
exit "$status"
