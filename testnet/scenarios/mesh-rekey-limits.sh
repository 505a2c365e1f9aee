#!/usr/bin/env bash
# needs: esp
# timeout: 400
# Re-keys on packet limits (issue 5): both agents run with
# --rekey-after-packets 2000, which becomes every SA's kernel soft packet
# limit (hard limit 4000). Under a UDP flow with sequence numbers (one
# datagram per 10 ms) and one long-lived TCP connection (a line every 20 ms,
# echoed) from host 1 to host 2, the kernel announces soft expiries through
# XFRM EXPIRE notifications and the agents re-key, make-before-break.
# Asserted: the agents received soft-expire notifications and re-keyed the
# pair several times (new SPIs each time), no SA ever reached its hard limit,
# not one UDP datagram was lost, and the TCP connection neither reset nor
# stalled for more than 1 s.
. "$(dirname "$0")/../lib/bed.sh"

LIMIT=2000
bed_up 2
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
start() {
    local i=$1 other=$((3 - $1))
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --seed "$(host_ip4 "$other"):9340" --rekey-after-packets "$LIMIT"
}
out_spi() { # host 1's outbound SPI towards host 2
    xfrm_spis 1 "$(host_ip4 1)" '*'
}
whole() {
    local i counts
    for i in 1 2; do
        counts=$(xfrm_dirs "$i")
        [[ ${counts% *} == 1 ]] || return 1
    done
}

for i in 1 2; do start "$i"; done
wait_until 120 whole
log "2-host mesh established"
# (Captured first: "grep -q" in a pipeline can SIGPIPE the writer under pipefail.)
states=$(on 1 ip -s xfrm state)
grep -qE "soft $LIMIT\(packets\), hard $((2 * LIMIT))\(packets\)" <<<"$states" ||
    fail "SAs do not carry the soft packet limit $LIMIT: $states"

DUR=70
flow_start 1 2

# Sample host 1's outbound SPI once a second: each new one is a re-key.
for s in $(seq 1 "$DUR"); do
    out_spi >>"$WORK/out-spis"
    sleep 1
done
sets=$(grep -c . <(sort -u "$WORK/out-spis"))

flow_check
for i in 1 2; do
    log "host $i: soft-expire notifications $(agent_status "$i" mesh kernel_soft_expires), soft limits reached $(agent_status "$i" mesh soft_limits_reached)," \
        "re-keys started $(agent_status "$i" mesh rekeys_started), hard expiries $(agent_status "$i" mesh kernel_hard_expires), SAs vanished $(agent_status "$i" mesh sas_vanished)"
done
log "host 1 sent on $sets different outbound SAs in $DUR s"
notified=$(($(agent_status 1 mesh kernel_soft_expires) + $(agent_status 2 mesh kernel_soft_expires)))
rekeys=$(($(agent_status 1 mesh rekeys_started) + $(agent_status 2 mesh rekeys_started)))
assert_cmp "$notified" -ge 3 "soft-expire notifications received (both hosts)"
assert_cmp "$rekeys" -ge 3 "re-keys started (both hosts)"
assert_cmp "$sets" -ge 4 "outbound SAs host 1 used"
for i in 1 2; do
    assert_eq "$(agent_status "$i" mesh kernel_hard_expires)" 0 "host $i SAs that reached the hard limit"
    assert_eq "$(agent_status "$i" mesh sas_vanished)" 0 "host $i SAs that vanished"
done
log "mesh-rekey-limits ok"
