#!/usr/bin/env bash
# needs: esp
# timeout: 480
# Trust issue, adversary scenario: 4 honest hosts form the mesh; then a member
# holding the right secret (host 5) (a) runs with another member's
# --node-name (h2), (b) publishes a member's address (host 2's, configured on
# its own port so its agent can bind it, ARP off), then (c) the address of a
# host running no agent (host 6). Throughout: the honest pairs keep their SPIs
# and fingerprints, the wire between hosts 1 and 2 carries only ESP and
# meshsec's UDP, the bystander stays reachable in plaintext from every honest
# host, and the refusals are counted and visible in `meshsec status` and
# `meshsec members`.
. "$(dirname "$0")/../lib/bed.sh"

bed_up 6
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
start() { # start I [extra agent args]
    local i=$1 seed=()
    shift
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" "${seed[@]}" "$@"
}
honest_established() {
    local i
    for i in 1 2 3 4; do [[ $(established_links "$i") == 3 ]] || return 1; done
}
HONEST=" $(host_ip4 1) $(host_ip4 2) $(host_ip4 3) $(host_ip4 4) "
# honest_spis I: "src dst spi" of host I's SAs between honest hosts (larval
# SPI reservations towards the claimed addresses do not count).
honest_spis() {
    local f1 f2 f3 f4 rest src= dst=
    on "$1" ip xfrm state | while read -r f1 f2 f3 f4 rest; do
        if [[ $f1 == src ]]; then
            src=$f2 dst=$f4
        elif [[ $f1 == proto && $f3 == spi && $HONEST == *" $src "* && $HONEST == *" $dst "* ]]; then
            echo "$src $dst $f4"
        fi
    done | sort
}
# honest_state: every honest host's SPIs and the fingerprints it lists.
honest_state() {
    local i
    for i in 1 2 3 4; do
        echo "h$i spis: $(honest_spis "$i" | tr '\n' ' ')"
        echo "h$i fingerprints: $(agent_ctl "$i" members --json | grep -o '"name":"h[1-4]","gossip_addr"[^}]*"fingerprint":"[^"]*"' | sed 's/,"gossip_addr.*"fingerprint"/ /' | sort | tr '\n' ' ')"
    done
}
# steal_address I ADDR: configure ADDR on host I's port without answering ARP
# for it, so the owner keeps its traffic while host I can bind and send from it.
steal_address() {
    on "$1" sysctl -qw net.ipv4.conf.eth0.arp_ignore=8 net.ipv4.conf.eth0.arp_announce=2
    on "$1" ip addr add "$2/32" dev eth0
}
bystander_reachable() {
    local i
    for i in 1 2 3 4; do
        on "$i" ping -n -c 2 -W 2 "$(host_ip4 6)" >/dev/null || fail "host $i cannot reach the bystander in plaintext"
    done
}
status_field_count() { # status_field_count I PATTERN: matches in host I's status JSON
    agent_ctl "$1" status --json | { grep -o "$2" || true; } | wc -l
}

for i in 1 2 3 4; do start "$i" --node-name "h$i" --data-address "$(host_ip4 "$i")"; done
wait_until 90 honest_established
log "4 honest hosts established"
before=$(honest_state)
echo "$before" >"$WORK/honest-before.txt"
capture_start honest "host $(host_ip4 1) and host $(host_ip4 2)"
bystander_reachable

# (a) a member runs with host 2's name: its own signing identity is refused.
start 5 --node-name h2 --data-address "$(host_ip4 5)"
impostor_refused() {
    local i
    for i in 1 3 4; do
        [[ $(status_field_count "$i" '"name":"h2","pinned"') -ge 1 ]] || return 1
    done
}
wait_until 60 impostor_refused
nap 10
for i in 1 3 4; do
    assert_cmp "$(agent_ctl "$i" members --json | { grep -o '"identity_conflict":"pinned' || true; } | wc -l)" -eq 1 "host $i shows h2's identity conflict"
done
assert_eq "$(honest_state)" "$before" "honest SPIs and fingerprints with an impostor named h2"
bystander_reachable
agent_stop 5

# (b) a member publishes host 2's address.
steal_address 5 "$(host_ip4 2)"
start 5 --node-name evil --data-address "$(host_ip4 2)"
listed_evil() { [[ $(listed 1 evil) == 1 ]]; }
wait_until 60 listed_evil
nap 15
for i in 1 3 4; do
    assert_cmp "$(status_field_count "$i" "\"claimant\":\"evil\"")" -ge 1 "host $i lists evil's claim as a conflict"
done
assert_eq "$(honest_state)" "$before" "honest SPIs and fingerprints with evil claiming host 2's address"
bystander_reachable
agent_stop 5
on 5 ip addr del "$(host_ip4 2)/32" dev eth0

# (c) a member publishes the address of a host running no agent.
steal_address 5 "$(host_ip4 6)"
start 5 --node-name evil2 --data-address "$(host_ip4 6)"
listed_evil2() { [[ $(listed 1 evil2) == 1 ]]; }
wait_until 60 listed_evil2
nap 20
bystander_reachable
for i in 1 2 3 4; do
    links=$(established_links "$i")
    assert_eq "$links" 3 "host $i: established links (none to evil2)"
done
assert_eq "$(honest_state)" "$before" "honest SPIs and fingerprints with evil2 claiming the bystander's address"
for i in 1 2 3 4; do agent_ctl "$i" status --json >"$WORK/h$i/status-end.json"; done
agent_stop 5

capture_stop honest
plain=$(capture_count honest "not esp and not arp and not (udp port 9340 or udp port 9341)")
log "capture 1<->2: $(capture_count honest) frames, $plain plaintext"
assert_eq "$plain" 0 "plaintext frames between hosts 1 and 2"
log "adversary ok"
