#!/usr/bin/env bash
# needs: none
# timeout: 120
# Proves the bed's own helpers on whatever kernel we are on: three hosts reach
# each other over IPv4 and IPv6, a partition blocks exactly one pair, heal
# restores it, netem delays, and a capture on the bridge sees the traffic.
. "$(dirname "$0")/../lib/bed.sh"

bed_up 3

capture_start all icmp or icmp6
for i in 1 2 3; do
    for j in 1 2 3; do
        [[ $i == "$j" ]] && continue
        assert on "$i" ping -c1 -W2 -q "$(host_ip4 "$j")"
        assert on "$i" ping -6 -c1 -W2 -q "$(host_ip6 "$j")"
    done
done
# No host may reach anything beyond the bed: there is no default route.
refute on 1 ip route get 198.51.100.1
refute on 1 ip -6 route get 2001:db8:1::1

partition 1 2
refute on 1 ping -c1 -W1 -q "$(host_ip4 2)"
refute on 2 ping -6 -c1 -W1 -q "$(host_ip6 1)"
assert on 1 ping -c1 -W2 -q "$(host_ip4 3)"
assert on 3 ping -6 -c1 -W2 -q "$(host_ip6 2)"
heal
assert on 1 ping -c1 -W2 -q "$(host_ip4 2)"
assert on 2 ping -6 -c1 -W2 -q "$(host_ip6 1)"

isolate 3
refute on 1 ping -c1 -W1 -q "$(host_ip4 3)"
refute on 3 ping -c1 -W1 -q "$(host_ip4 2)"
heal 3 1
assert on 1 ping -c1 -W2 -q "$(host_ip4 3)"
refute on 3 ping -c1 -W1 -q "$(host_ip4 2)"
heal

# A background job started with on_bg stops on SIGINT (ping then prints its
# summary), unlike "on I CMD &" whose SIGINT bash ignores.
on_bg 1 ping -i 0.2 -q "$(host_ip4 3)" >"$WORK/ping-bg.txt" 2>&1
pinger=$BG_PID
nap 1
bg_stop "$pinger" || true
assert grep -q 'packets transmitted' "$WORK/ping-bg.txt"
refute kill -0 "$pinger" 2>/dev/null

capture_stop all
assert_cmp "$(capture_count all icmp)" -gt 0 "ICMP packets captured on the bridge"
assert_cmp "$(capture_count all icmp6)" -gt 0 "ICMPv6 packets captured on the bridge"

# wait_until must give up and fail when the condition never holds.
if (wait_until 1 false) 2>/dev/null; then fail "wait_until 1 false succeeded"; fi
log "bed self-test ok"
