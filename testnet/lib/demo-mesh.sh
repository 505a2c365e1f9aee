#!/usr/bin/env bash
# needs: esp
# timeout: 400
# The body of testnet/demo: an encrypted mesh of DEMO_N hosts (default 4)
# from one seed, on a kernel with ESP (directly, or inside the testnet VM).
# Prints `meshsec members`, a few lines of `ip xfrm state`, and proof from a
# capture that traffic between members is ESP.
. "$(dirname "$0")/bed.sh"

N=${DEMO_N:-4}
bed_up "$N"
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
for i in $(seq 1 "$N"); do
    seed=()
    ((i > 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "host$i" \
        --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" "${seed[@]}"
done
established() {
    [[ $(established_links "$N") == $(((N - 1) * 2)) ]]
}
wait_until 120 established
capture_start demo "not arp"
on 1 ping -c3 -i0.3 -q "$(host_ip4 2)" >/dev/null
on 1 ping -6 -c3 -i0.3 -q "$(host_ip6 2)" >/dev/null
capture_stop demo
sleep 2.5 # the listing's kernel counters refresh every 2 s
on 1 ip xfrm state >"$WORK/xfrm-state.txt"
{
    echo
    echo "\$ meshsec members        # on host1, after it pinged host2"
    agent_ctl 1 members
    echo
    echo "\$ ip xfrm state | head   # on host1 (meshsec's SAs: reqid 0x6d73....)"
    # Key material masked: it is secret even in a demo. (sed stops itself
    # after 12 lines: a "| head" would SIGPIPE sed under pipefail once the
    # listing outgrows one write.)
    sed -E 's/(aead [^ ]+) 0x[0-9a-f]+/\1 <key>/; 12q' "$WORK/xfrm-state.txt"
    echo
    echo "\$ tcpdump (bridge) while host1 pings host2 over IPv4 and IPv6:"
    tcpdump -r "$(capture_file demo)" -n "(host $(host_ip4 1) or host $(host_ip6 1)) and not udp" >"$WORK/tcpdump.txt" 2>/dev/null
    head -n 8 "$WORK/tcpdump.txt"
    echo "  ... $(capture_count demo "ip proto 50 or ip6 proto 50") ESP packets, $(capture_count demo "icmp or (icmp6 and (ip6[40] == 128 or ip6[40] == 129))") plaintext ICMP echo packets"
} | tee "$WORK/demo-output.txt"
