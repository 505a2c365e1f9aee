#!/usr/bin/env bash
# needs: no-esp
# timeout: 60
# On a kernel without ESP (this build machine's own), the agent's start-up
# probe refuses to start with one line naming what is missing and the fix,
# exit status 2, and creates nothing (no state dir, no control socket, no
# XFRM state left behind). Skipped as inapplicable only where ESP exists:
# the runner routes it to a kernel that lacks ESP, which is what it proves.
. "$(dirname "$0")/../lib/bed.sh"

bed_up 1
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
rc=0
on 1 "$MESHSEC_BIN" agent --listen "$(host_ip4 1):9340" --secret-file "$WORK/secret" \
    --state-dir "$WORK/state" --control-socket "$WORK/c.sock" --node-name h1 >"$WORK/out.txt" 2>&1 || rc=$?
log "agent said: $(cat "$WORK/out.txt")"
assert_eq "$rc" 2 "exit status"
assert_eq "$(wc -l <"$WORK/out.txt")" 1 "lines of output"
assert grep -q "kernel lacks ESP" "$WORK/out.txt"
assert grep -q "modprobe esp4" "$WORK/out.txt"
refute test -e "$WORK/state"
refute test -e "$WORK/c.sock"
[[ -z $(on 1 ip xfrm state) ]] || fail "the probe left an SA behind"
log "probe error ok"
