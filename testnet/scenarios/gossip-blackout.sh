#!/usr/bin/env bash
# needs: esp
# timeout: 420
# Trust issue, finding 4 (fail-open on gossip loss, no secret needed): gossip
# and handshake UDP to and from host 2 are dropped (tc on its port) for three
# times --peer-grace-secs while host 1 pings it. Host 1 declares host 2 dead,
# its SAs go after the grace period, its policies stay: the capture between
# the two shows zero plaintext frames, host 1's status lists the blocked pair.
# Hosts 1 and 3 keep their link throughout. Once the drop is lifted the link re-keys by
# itself and the pings are answered again; `meshsec forget` releases a pair.
. "$(dirname "$0")/../lib/bed.sh"

GRACE=10
bed_up 3
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
start() {
    local i=$1 seed=()
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --peer-grace-secs "$GRACE" "${seed[@]}"
}
all_established() {
    local i
    for i in 1 2 3; do [[ $(established_links "$i") == 2 ]] || return 1; done
}
# blocked_pairs I: how many pairs host I's status lists as blocked.
blocked_pairs() { agent_ctl "$1" status --json | { grep -o '"reason":"[a-z_]*"' || true; } | wc -l; }
# udp_block I / udp_unblock I: drop meshsec's gossip (9340) and handshake
# (9341) UDP in both directions on host I's port; ESP and ICMP pass.
udp_block() {
    local p
    on "$1" tc qdisc add dev eth0 clsact
    for p in 9340 9341; do
        on "$1" tc filter add dev eth0 ingress protocol ip u32 \
            match ip protocol 17 0xff match ip dport "$p" 0xffff action drop
        on "$1" tc filter add dev eth0 egress protocol ip u32 \
            match ip protocol 17 0xff match ip dport "$p" 0xffff action drop
    done
    log "host $1: gossip and handshake UDP dropped"
}
udp_unblock() {
    on "$1" tc qdisc del dev eth0 clsact
    log "host $1: gossip and handshake UDP pass again"
}

for i in 1 2 3; do start "$i"; done
wait_until 90 all_established
log "3-host mesh established"
h1=$(host_ip4 1) h2=$(host_ip4 2)
capture_start blackout "host $h1 and host $h2"
on_bg 1 ping -n -i 0.2 "$h2" >"$WORK/ping.txt" 2>&1
PING_PID=$BG_PID

udp_block 2
t0=$SECONDS
# Past the grace period host 1 removes the SAs towards host 2, keeps the policies.
no_sas_to_h2() { [[ $(on 1 ip xfrm state | grep -c "^src .*$h2" || true) == 0 ]]; }
wait_until $((GRACE * 3)) no_sas_to_h2
log "host 1 removed its SAs towards host 2 $((SECONDS - t0)) s into the blackout"
assert_cmp "$(blocked_pairs 1)" -eq 1 "blocked pairs on host 1"
assert_cmp "$(on 1 ip xfrm policy | grep -c "$h2")" -ge 2 "host 1's policies towards host 2 kept"
agent_ctl 1 status >"$WORK/status-h1-blackout.txt"
while ((SECONDS - t0 < GRACE * 3)); do nap 1; done
# Hosts 1 and 3 kept their link (host 2 is cut off from both).
assert_eq "$(established_links 1)" 1 "host 1's links during the blackout"
assert_eq "$(established_links 3)" 1 "host 3's links during the blackout"
udp_unblock 2

wait_until 90 all_established
log "link 1-2 re-established $((SECONDS - t0)) s after the blackout began"
assert_eq "$(blocked_pairs 1)" 0 "blocked pairs on host 1 after recovery"
replies_before=$(grep -c 'bytes from' "$WORK/ping.txt" || true)
nap 3
replies_after=$(grep -c 'bytes from' "$WORK/ping.txt" || true)
assert_cmp "$replies_after" -gt "$replies_before" "pings answered again after recovery"
bg_stop "$PING_PID" || true
capture_stop blackout

# The wire between hosts 1 and 2 carried ESP, meshsec's UDP, ARP: nothing else.
plain=$(capture_count blackout "not esp and not arp and not (udp port 9340 or udp port 9341)")
total=$(capture_count blackout)
log "capture 1<->2: $total frames, $plain plaintext"
assert_eq "$plain" 0 "plaintext frames between hosts 1 and 2"
assert_cmp "$total" -gt 0 "frames captured"

# `meshsec forget` releases a pair that will not come back.
agent_stop 2
h2_blocked() { [[ $(blocked_pairs 1) -ge 1 ]]; }
wait_until $((GRACE * 4)) h2_blocked
agent_ctl 1 forget h2 >"$WORK/forget.txt"
log "forget: $(<"$WORK/forget.txt")"
nap 3
assert_eq "$(blocked_pairs 1)" 0 "blocked pairs on host 1 after forget"
assert_eq "$(on 1 ip xfrm policy | grep -c "$h2" || true)" 0 "host 1's policies towards host 2 after forget"
log "gossip-blackout ok"
