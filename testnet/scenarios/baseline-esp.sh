#!/usr/bin/env bash
# needs: esp
# timeout: 180
# Proves the bed carries a real ESP datapath: two hosts with hand-installed
# transport-mode SAs and policies (rfc4106(gcm(aes))) ping each other and move
# a TCP stream over IPv4 and IPv6, and the capture on the bridge holds ESP
# only: no plain TCP or ICMP echo between them, and the marker string sent
# over TCP appears nowhere in it.
#
# MESHSEC_TESTNET_BREAK deliberately breaks the setup, to prove the checks
# bite (the scenario must then FAIL):
#   no-xfrm  install nothing: traffic flows in plaintext
#   no-sa    policies only, no SAs: the kernel has no key and drops traffic
. "$(dirname "$0")/../lib/bed.sh"

break=${MESHSEC_TESTNET_BREAK:-}
bed_up 2
a4=$(host_ip4 1) b4=$(host_ip4 2) a6=$(host_ip6 1) b6=$(host_ip6 2)

case $break in
    "") xfrm_pair 1 2 46 ;;
    no-xfrm) log "BREAK: no SAs and no policies installed" ;;
    no-sa)
        log "BREAK: policies without SAs"
        xfrm_policy_pair 1 "$a4" "$b4" 32
        xfrm_policy_pair 2 "$b4" "$a4" 32
        ;;
    *) fail "unknown MESHSEC_TESTNET_BREAK=$break" ;;
esac

marker="MESHSEC-PLAINTEXT-MARKER-$RANDOM$RANDOM"
printf -v payload "$marker %s\n" {1..4000}
printf %s "$payload" >"$WORK/payload"

capture_start wire
assert on 1 ping -c3 -i0.2 -W2 -q "$b4"
assert on 2 ping -6 -c3 -i0.2 -W2 -q "$a6"

# A TCP stream each way of the address families, checked byte for byte.
tcp_transfer() {
    local dst=$1 listen=$2 name=$3
    on 2 socat -u "TCP-LISTEN:5001,$listen,reuseaddr" "CREATE:$WORK/$name" &
    local srv=$!
    wait_until 10 tcp_listening 2 5001
    on 1 timeout 60 socat -u "OPEN:$WORK/payload" "TCP:$dst:5001"
    wait "$srv" || fail "TCP receiver on host 2 failed ($name)"
    assert cmp -s "$WORK/payload" "$WORK/$name"
    log "TCP transfer $name: $(stat -c %s "$WORK/$name") bytes intact"
}
tcp_transfer "$b4" pf=ip4 received4
tcp_transfer "[$b6]" pf=ip6 received6
capture_stop wire

esp=$(capture_count wire "(ip proto 50 or ip6 proto 50)")
tcp=$(capture_count wire tcp)
echo4=$(capture_count wire icmp)
echo6=$(capture_count wire "icmp6 and (ip6[40] == 128 or ip6[40] == 129)")
log "capture: $esp ESP, $tcp plain TCP, $echo4 ICMP, $echo6 ICMPv6 echo packets"
if grep -aqF "$marker" "$(capture_file wire)"; then
    fail "the TCP payload marker is readable in the capture: traffic left the host unencrypted"
fi
assert_cmp "$tcp" -eq 0 "plain TCP packets on the wire"
assert_cmp "$echo4" -eq 0 "plain ICMP packets on the wire"
assert_cmp "$echo6" -eq 0 "plain ICMPv6 echo packets on the wire"
assert_cmp "$esp" -gt 0 "ESP packets on the wire"

# The kernel agrees: both SAs on host 1 carried traffic.
on 1 ip -s xfrm state >"$WORK/h1/xfrm-state.txt"
assert_cmp "$(xfrm_sa_count 1)" -eq 4 "SAs on host 1"
log "baseline ESP datapath ok"
