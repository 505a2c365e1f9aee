#!/usr/bin/env bash
# needs: esp vm
# timeout: 420
# ESP GSO offload (issue 12) on the guest's Debian kernel, where
# esp4_offload/esp6_offload are loadable but not loaded: (1) the agent has the
# kernel load both through its own module autoload (probe SA with
# XFRMA_OFFLOAD_DEV on lo) before its first SA; its SAs hold the module and
# status says "autoloaded" (and "loaded" on a host started after); (2) with the kernel's autoload disabled and no
# usable modprobe, the agent still starts, logs exactly one warning with the
# fix and reports "absent"; (3) with only modprobe working, it runs modprobe:
# "modprobed". Module state is global to the VM: needs the VM, and unloads
# the modules first (nothing else may hold an SA then).
. "$(dirname "$0")/../lib/bed.sh"
. "$(dirname "$0")/../lib/common.sh"

[[ ${MESHSEC_TESTNET_GUEST:-} == 1 ]] || fail "loads and unloads kernel modules: run in the VM (testnet/run esp-offload)"
MODS=(esp4_offload esp6_offload)
loaded() { [[ -d /sys/module/$1 ]]; }
unload_all() {
    local m t
    for m in "${MODS[@]}"; do
        for ((t = 0; t < 50; t++)); do
            loaded "$m" || break
            rmmod "$m" 2>/dev/null || nap 0.2
        done
        loaded "$m" && fail "cannot unload $m (refcnt $(cat /sys/module/$m/refcnt)): SAs still hold it"
    done
    log "offload modules unloaded"
}
KMODPROBE=$(cat /proc/sys/kernel/modprobe)
restore_modprobe() { echo "$KMODPROBE" >/proc/sys/kernel/modprobe; }
trap 'rc=$?; restore_modprobe; (exit $rc); bed_cleanup' EXIT

bed_up 2
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
start() { # start I [extra args]
    local i=$1 seed=()
    shift
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" "${seed[@]}" "$@"
}
status_json() { agent_ctl "$1" status --json; }
offload_json() { # the "esp_offload" object of host I's status
    local j
    j=$(status_json "$1")
    [[ $j =~ \"esp_offload\":(\{[^}]*\}) ]] || fail "no esp_offload in status: $j"
    echo "${BASH_REMATCH[1]}"
}
control_up() { agent_ctl "$1" status >/dev/null 2>&1; }

# --- 1: the kernel's own autoload, asked for by the agent --------------------
unload_all
for m in "${MODS[@]}"; do refute loaded "$m"; done
start 1
wait_until 60 control_up 1
start 2
both_ready() { [[ $(established_links 1) == 2 && $(established_links 2) == 2 ]]; }
wait_until 120 both_ready
for m in "${MODS[@]}"; do
    assert loaded "$m"
done
assert_eq "$(offload_json 1)" '{"v4":"autoloaded","v6":"autoloaded"}' "host 1 status --json esp_offload"
# Host 2 started after host 1's probe: it finds them loaded.
assert_eq "$(offload_json 2)" '{"v4":"loaded","v6":"loaded"}' "host 2 status --json esp_offload"
assert_eq "$(agent_status 1 esp_offload v6)" autoloaded "bed_query esp_offload v6"
agent_ctl 1 status >"$WORK/status-h1.txt"
grep -q '^esp offload:  v4 loaded (kernel autoload, requested by the agent), v6 loaded (kernel autoload' "$WORK/status-h1.txt" \
    || fail "human status: $(grep 'esp offload' "$WORK/status-h1.txt")"
refute grep -q 'WARN.*without GSO' "$(agent_log 1)" "$(agent_log 2)"
# Every SA created while a module is loaded holds a reference to it: 2 SAs per
# host and family (refcnt counts them; nothing else in the VM holds one).
v4=$(cat /sys/module/esp4_offload/refcnt) v6=$(cat /sys/module/esp6_offload/refcnt)
log "module references with both agents' SAs installed: esp4_offload $v4, esp6_offload $v6"
assert_cmp "$v4" -ge 4 "esp4_offload references (4 IPv4 SAs)"
assert_cmp "$v6" -ge 4 "esp6_offload references (4 IPv6 SAs)"
on 1 ping -c2 -W2 "$(host_ip4 2)" >/dev/null || fail "ping over ESP failed"
on 1 ping -6 -c2 -W2 "$(host_ip6 2)" >/dev/null || fail "ping6 over ESP failed"
for i in 1 2; do
    agent_stop "$i"
    on "$i" "$MESHSEC_BIN" flush --control-socket "$(agent_socket "$i")" >/dev/null
done

# --- 2: neither the kernel's autoload nor modprobe can load it ---------------
unload_all
echo /nonexistent/modprobe >/proc/sys/kernel/modprobe
# The guest's userland (the host's) has no /lib/modules for this kernel: a
# plain modprobe fails, as on a host without the module package.
refute modprobe -q esp4_offload
start 1
wait_until 60 control_up 1
assert_eq "$(offload_json 1)" '{"v4":"absent","v6":"absent"}' "status --json esp_offload without any way to load"
for m in "${MODS[@]}"; do refute loaded "$m"; done
n=$(grep -c 'WARN.*without GSO' "$(agent_log 1)")
assert_eq "$n" 1 "warning lines about GSO"
w=$(grep 'WARN.*without GSO' "$(agent_log 1)")
log "the warning: $w"
[[ $w == *"IPv4 and IPv6"* && $w == *'`modprobe esp4_offload esp6_offload`'* && $w == *"/etc/modules-load.d/"* ]] \
    || fail "warning lacks the families or the fix: $w"
agent_ctl 1 status | grep -q '^esp offload:  v4 absent: ESP without GSO, v6 absent: ESP without GSO (fix: modprobe' \
    || fail "human status: $(agent_ctl 1 status | grep 'esp offload')"
agent_stop 1

# --- 3: only modprobe works (as root with CAP_SYS_MODULE on a normal host) ---
# A modprobe early in the agent's PATH that finds the guest kernel's modules
# (kmod's modprobe, pointed at the cached module tree).
mkdir -p "$WORK/bin"
printf '#!/bin/sh\necho "$*" >>%q\nexec %q -d %q "$@"\n' "$WORK/modprobe-calls" "$(command -v modprobe)" "$(guest_module_root)" >"$WORK/bin/modprobe"
chmod +x "$WORK/bin/modprobe"
lines_before=$(wc -l <"$(agent_log 1)")
PATH=$WORK/bin:$PATH start 1
wait_until 60 control_up 1
assert_eq "$(offload_json 1)" '{"v4":"modprobed","v6":"modprobed"}' "status --json esp_offload with modprobe only"
for m in "${MODS[@]}"; do assert loaded "$m"; done
assert_eq "$(cat "$WORK/modprobe-calls" | tr '\n' ' ')" "esp4_offload esp6_offload " "modprobe calls"
assert_eq "$(tail -n +"$((lines_before + 1))" "$(agent_log 1)" | { grep -c 'WARN.*without GSO' || true; })" 0 "GSO warnings once modprobe worked"
agent_stop 1
on 1 "$MESHSEC_BIN" flush --control-socket "$(agent_socket 1)" >/dev/null
restore_modprobe
log "ESP GSO offload: kernel autoload, warning and modprobe paths ok"
