#!/usr/bin/env bash
# needs: esp
# timeout: 240
# Proves the baseline's checks bite: the baseline-esp scenario, run with each
# deliberate break (MESHSEC_TESTNET_BREAK=no-xfrm: nothing installed, traffic
# in clear; =no-sa: policies without SAs, traffic dropped), must FAIL, and must
# leave no namespace behind when it does.
. "$(dirname "$0")/../lib/bed.sh"

for brk in no-xfrm no-sa; do
    rc=0
    MESHSEC_TESTNET_BREAK=$brk MESHSEC_WORK=$WORK/$brk MESHSEC_BED_ID=$((BED_ID + 7000)) \
        bash "$(dirname "$0")/baseline-esp.sh" >"$WORK/$brk.log" 2>&1 || rc=$?
    ((rc != 0)) || fail "baseline-esp passed with MESHSEC_TESTNET_BREAK=$brk"
    grep -q "FAIL" "$WORK/$brk.log" || fail "baseline-esp with $brk failed without naming a failed check"
    log "baseline-esp with $brk fails as it must: $(grep -m1 FAIL "$WORK/$brk.log")"
    if grep -q "^ms$((BED_ID + 7000))-" <<<"$(ip netns list)"; then fail "the broken run left namespaces behind"; fi
done
log "baseline-esp-broken ok"
