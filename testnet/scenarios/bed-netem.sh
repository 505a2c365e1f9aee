#!/usr/bin/env bash
# needs: netem
# timeout: 120
# The bed's netem helper really shapes a host's link: a 200 ms delay shows in
# the round trip, 100% loss stops traffic, and clearing restores it.
. "$(dirname "$0")/../lib/bed.sh"

bed_up 2
assert on 1 ping -c1 -W2 -q "$(host_ip4 2)"

netem 2 "delay 200ms"
rtt=$(on 1 ping -c1 -W3 "$(host_ip4 2)" | sed -n 's/.*time=\([0-9.]*\).*/\1/p')
[[ -n $rtt ]] || fail "no reply with a 200 ms delay"
assert_cmp "${rtt%.*}" -ge 200 "round trip (ms) with 200 ms netem delay"

netem 2 "loss 100%"
refute on 1 ping -c2 -W1 -q "$(host_ip4 2)"

netem_clear 2
assert on 1 ping -c1 -W2 -q "$(host_ip4 2)"
rtt=$(on 1 ping -c1 -W3 "$(host_ip4 2)" | sed -n 's/.*time=\([0-9.]*\).*/\1/p')
assert_cmp "${rtt%.*}" -lt 100 "round trip (ms) after netem_clear"
