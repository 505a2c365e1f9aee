#!/usr/bin/env bash
# needs: esp
# timeout: 420
# Strict mode (--protect): hosts 1 and 2 run agents protecting the bed's IPv4
# and IPv6 ranges; host 3 runs no agent. Host 3 cannot be reached from a
# protected host (the ping fails, the protected host sends no plaintext frame;
# host 3's own clear pings go unanswered), members
# reach each other over ESP only (SA byte counters grow), IPv6 neighbour
# discovery still resolves members, the host still reaches its own
# addresses, gossip and handshakes work through the blocks (bypassed
# sockets), `meshsec status` lists the ranges; after kill -9 the blocks stay;
# a restart adopts them unchanged; a reload that drops a range removes it.
. "$(dirname "$0")/../lib/bed.sh"

bed_up 3
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
R4=192.0.2.0/24
R6=2001:db8::/64
start() { # start I [extra agent args]
    local i=$1 seed=()
    shift
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" \
        --node-name "h$i" --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" "${seed[@]}" "$@"
}
# reach I ADDR: one ping from host I answered.
reach() { on "$1" ping -n -c 1 -W 2 "$2" >/dev/null 2>&1; }
blocks() { on "$1" ip xfrm policy | grep -c "action block priority 28021" || true; }
esp_bytes() { # esp_bytes I: bytes over all of host I's SAs
    on "$1" ip -s xfrm state | awk '/lifetime current:/ { getline; split($1, a, "("); s += a[1] } END { print s + 0 }'
}
both_established() { [[ $(established_links 1) == 2 && $(established_links 2) == 2 ]]; }

# Without strict mode host 3 answers in clear: the checks below can fail.
assert reach 1 "$(host_ip4 3)"
assert reach 1 "$(host_ip6 3)"

start 1 --protect "$R4" --protect "$R6"
start 2 --protect "$R4" --protect "$R6"
wait_until 90 both_established
log "hosts 1 and 2 established (v4 and v6) with the blocks in place"
assert_eq "$(blocks 1)" 4 "host 1: block policies (in and out per range)"
status=$(agent_ctl 1 status --json)
[[ $status == *'"protect":{"ranges":["192.0.2.0/24","2001:db8::/64"],"policies":8}'* ]] ||
    fail "host 1 status lacks the protected ranges: $status"
agent_ctl 1 status | grep -q "^protect: *192.0.2.0/24, 2001:db8::/64" || fail "status text lacks the ranges"

capture_start strict "host $(host_ip4 1) or host $(host_ip6 1)"
before=$(esp_bytes 1)
for fam in 4 6; do
    refute reach 1 "$(host_ip$fam 3)"
    refute reach 3 "$(host_ip$fam 1)"
    assert reach 1 "$(host_ip$fam 2)"
    assert reach 2 "$(host_ip$fam 1)"
    assert reach 1 "$(host_ip$fam 1)" # the host talking to itself
done
after=$(esp_bytes 1)
assert_cmp "$after" -gt "$before" "host 1's SA byte counters grow with member pings"
# Neighbour discovery inside the protected range: forget the neighbours, then
# a member must be resolved again (NS/NA pass the blocks).
on 1 ip -6 neigh flush dev eth0
on 2 ip -6 neigh flush dev eth0
assert reach 1 "$(host_ip6 2)"
on 1 ip -6 neigh show "$(host_ip6 2)" | grep -q lladdr || fail "host 1 did not resolve host 2 over IPv6 ND"

# kill -9: nothing removes the blocks; the members' SAs keep carrying traffic.
agent_kill9 1
nap 3
assert_eq "$(blocks 1)" 4 "host 1: block policies after kill -9"
for fam in 4 6; do
    refute reach 1 "$(host_ip$fam 3)"
    assert reach 1 "$(host_ip$fam 2)"
done
capture_stop strict
CLEAR="not esp and not arp and not (udp port 9340 or udp port 9341) and not (icmp6 and (ip6[40] == 135 or ip6[40] == 136))"
H1="(src host $(host_ip4 1) or src host $(host_ip6 1))"
M12="((host $(host_ip4 1) and host $(host_ip4 2)) or (host $(host_ip6 1) and host $(host_ip6 2)))"
plain=$(capture_count strict "$CLEAR and $H1")
members=$(capture_count strict "$CLEAR and $M12")
# Host 3 runs no agent and sends in clear: what arrives is dropped, unanswered.
unanswered=$(capture_count strict "$CLEAR and (src host $(host_ip4 3) or src host $(host_ip6 3))")
log "capture of host 1: $(capture_count strict) frames; plaintext from host 1: $plain, between members: $members, from host 3 (dropped): $unanswered"
assert_eq "$plain" 0 "plaintext frames sent by host 1"
assert_eq "$members" 0 "plaintext frames between hosts 1 and 2"
assert_cmp "$unanswered" -gt 0 "host 3's clear pings reached host 1's wire (and went unanswered)"
assert_cmp "$(capture_count strict "icmp6 and (ip6[40] == 135 or ip6[40] == 136)")" -gt 0 "neighbour discovery on the wire"

# Restart from a config file with the same ranges: adopted, not duplicated.
printf 'protect = ["%s", "%s"]\n' "$R4" "$R6" >"$WORK/h1.toml"
start 1 --config "$WORK/h1.toml"
wait_until 90 both_established
assert_eq "$(blocks 1)" 4 "host 1: block policies after the restart"
assert_eq "$(on 1 ip xfrm policy | grep -c 'priority 2802[01]')" 8 "host 1: range policies after the restart"

# Reload without the IPv6 range: its policies go, host 3 answers over IPv6
# in clear again, IPv4 stays blocked.
printf 'protect = ["%s"]\n' "$R4" >"$WORK/h1.toml"
agent_ctl 1 reload
v6_gone() { [[ $(blocks 1) == 2 ]]; }
wait_until 20 v6_gone
assert reach 1 "$(host_ip6 3)"
refute reach 1 "$(host_ip4 3)"
assert reach 1 "$(host_ip6 2)"
# A bad range on reload changes nothing and says why.
printf 'protect = ["%s", "10.0.0.1/8"]\n' "$R4" >"$WORK/h1.toml"
out=$(agent_ctl 1 reload 2>&1 || true)
[[ $out == *'protect'*'host bits'* ]] || fail "bad reload not explained: $out"
assert_eq "$(blocks 1)" 2 "host 1: block policies after a refused reload"
log "protect ok"
