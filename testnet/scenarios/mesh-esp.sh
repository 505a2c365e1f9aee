#!/usr/bin/env bash
# needs: esp
# timeout: 600
# Issue 4 acceptance on a real ESP kernel: 5 agents from one seed key every
# ordered pair with kernel transport-mode ESP over IPv4 and IPv6: exactly two
# meshsec SAs per peer and family, all of the chosen AEAD; ping and TCP work
# between every pair; the wire carries only ESP and the control plane's UDP;
# plaintext UDP from a member is dropped; a host with the wrong secret gets
# and causes nothing; a policy deleted by hand is put back, an SA deleted by
# hand noticed within 1 s. ESP_ALG selects the cluster-wide algorithm.
. "$(dirname "$0")/../lib/bed.sh"

ESP_ALG=${ESP_ALG:-aes128-gcm}
case $ESP_ALG in
    aes128-gcm) KALG='rfc4106(gcm(aes))' ;;
    aes256-gcm) KALG='rfc4106(gcm(aes))' ;;
    chacha20-poly1305) KALG='rfc7539esp(chacha20,poly1305)' ;;
    *) fail "unknown ESP_ALG=$ESP_ALG" ;;
esac
N=5
bed_up $((N + 1))
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
"$MESHSEC_BIN" init --out "$WORK/foreign" 2>/dev/null

start() { # start I SECRET
    local i=$1 secret=$2 seed=()
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" --esp-algorithm "$ESP_ALG" "${seed[@]}"
}
all_established() {
    local i
    for i in $(seq 1 $N); do [[ $(established_links "$i") == $(((N - 1) * 2)) ]] || return 1; done
}

t0=$SECONDS
for i in $(seq 1 $N); do start "$i" "$WORK/secret"; done
start $((N + 1)) "$WORK/foreign"
wait_until 60 all_established
log "every ordered pair established over IPv4 and IPv6 after $((SECONDS - t0)) s (polling included)"
# The agents' own logs: from the last member's start to the last link installed.
first=$(grep -m1 'agent started' "$(agent_log $N)" | cut -d' ' -f1)
last=$(cat $(for i in $(seq 1 $N); do agent_log "$i"; done) | grep -E 'SAs and policies installed|responder session confirmed' | cut -d' ' -f1 | sort | tail -n1)
took=$(awk -v a="$(date -d "$first" +%s.%N)" -v b="$(date -d "$last" +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
log "last member started -> every link installed on every host: $took s"
agent_ctl 1 members >"$WORK/members-h1.txt"

# Kernel state: exactly 2 SAs per peer and family, all with the chosen AEAD.
# (Parsed with bash builtins: every exec is slow in the emulated VM.)
foreign_re="^($(host_ip4 $((N + 1)))|$(host_ip6 $((N + 1))))\$"
for i in $(seq 1 $N); do
    on "$i" ip xfrm state >"$WORK/h$i/xfrm-state.txt"
    on "$i" ip xfrm policy >"$WORK/h$i/xfrm-policy.txt"
    declare -A pair_count=()
    total=0 aead=0
    while read -r w1 src w3 dst _; do
        if [[ $w1 == src ]]; then
            total=$((total + 1))
            [[ $src =~ $foreign_re || $dst =~ $foreign_re ]] && fail "host $i has an SA with the wrong-secret host"
            pair_count["$src $dst"]=$((${pair_count["$src $dst"]:-0} + 1))
        elif [[ $w1 == aead && $src == "$KALG" ]]; then
            aead=$((aead + 1))
        fi
    done <"$WORK/h$i/xfrm-state.txt"
    assert_eq "$total" $(((N - 1) * 2 * 2)) "SAs on host $i"
    assert_eq "$aead" "$total" "SAs with $KALG on host $i"
    for j in $(seq 1 $N); do
        ((i == j)) && continue
        for fam in 4 6; do
            a=$(host_ip$fam "$i") b=$(host_ip$fam "$j")
            assert_eq "${pair_count["$a $b"]:-0}/${pair_count["$b $a"]:-0}" 1/1 "SAs out/in between host $i and $b"
        done
    done
    unset pair_count
done
[[ -z $(on $((N + 1)) ip xfrm state) ]] || fail "the wrong-secret host has SAs"
# (Its own sockets' bypass policies are listed too: they carry no template.)
on $((N + 1)) ip xfrm policy >"$WORK/h$((N + 1))/xfrm-policy.txt"
refute grep -q tmpl "$WORK/h$((N + 1))/xfrm-policy.txt"

# Ping and a TCP transfer between every pair, both families.
printf 'MESHSEC-MARKER-%s\n' {1..2000} >"$WORK/payload"
tcp_transfer() { # tcp_transfer FROM TO ADDR PF
    local from=$1 to=$2 addr=$3 pf=$4 out="$WORK/rx-$1-$2-$4"
    on "$to" socat -u "TCP-LISTEN:5001,pf=$pf,reuseaddr" "CREATE:$out" &
    local srv=$!
    wait_until 10 tcp_listening "$to" 5001
    on "$from" timeout 60 socat -u "OPEN:$WORK/payload" "TCP:$addr:5001"
    wait "$srv" || fail "TCP receiver on host $to failed"
    cmp -s "$WORK/payload" "$out" || fail "TCP $from -> $to ($pf) corrupted"
}
capture_start wire "not arp"
for i in $(seq 1 $N); do
    for j in $(seq 1 $N); do
        ((i == j)) && continue
        assert on "$i" ping -c1 -W3 -q "$(host_ip4 "$j")"
        assert on "$i" ping -6 -c1 -W3 -q "$(host_ip6 "$j")"
        if ((i < j)); then
            tcp_transfer "$i" "$j" "$(host_ip4 "$j")" ip4
            tcp_transfer "$i" "$j" "[$(host_ip6 "$j")]" ip6
        fi
    done
done
capture_stop wire
members="$(host_ip4 1)"
for i in $(seq 2 $N); do members+=" or $(host_ip4 "$i")"; done
members6="$(host_ip6 1)"
for i in $(seq 2 $N); do members6+=" or $(host_ip6 "$i")"; done
esp=$(capture_count wire "ip proto 50 or ip6 proto 50")
# Anything between members that is neither ESP nor the control plane's UDP.
other=$(capture_count wire "((src host $members) and (dst host $members)) or ((src host $members6) and (dst host $members6)) and not (ip proto 50 or ip6 proto 50) and not (udp port 9340 or udp port 9341) and not icmp6")
plain_icmp6=$(capture_count wire "icmp6 and (ip6[40] == 128 or ip6[40] == 129)")
log "capture: $esp ESP packets, $other other packets between members, $plain_icmp6 plain ICMPv6 echo"
assert_cmp "$esp" -gt 100 "ESP packets on the wire"
assert_eq "$other" 0 "non-ESP, non-control packets between members"
assert_eq "$plain_icmp6" 0 "plaintext ICMPv6 echo between members"
if grep -aqF MESHSEC-MARKER "$(capture_file wire)"; then fail "TCP payload readable on the wire"; fi

# Fail closed: plaintext UDP from a member is dropped by the receiver's
# required inbound policy. The sender's socket carries an outbound bypass
# policy (IP_XFRM_POLICY, as meshsec's own control sockets do), so the
# datagram really leaves host 1 in clear.
rx=$WORK/udp-rx
on 2 socat -u "UDP4-RECV:7001" "CREATE:$rx" &
udp_srv=$!
ledger_add "$BED_LEDGER" pid "$udp_srv"
wait_until 10 udp_bound 2 7001
# Host 2's inbound drops for want of an SA or a matching policy.
policy_drops() { on 2 awk '/XfrmInNoStates|XfrmInTmplMismatch|XfrmInNoPols/ {s+=$2} END {print s+0}' /proc/net/xfrm_stat; }
before=$(policy_drops)
capture_start plain "udp port 7001"
on 1 python3 -c '
import socket, sys
info = bytearray(168)              # struct xfrm_userpolicy_info, all zero:
info[40] = socket.AF_INET          #   selector.family
info[160] = 1                      #   dir = XFRM_POLICY_OUT (offset 160), action 0 = ALLOW
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 17, bytes(info))   # IP_XFRM_POLICY
for _ in range(3):
    s.sendto(b"MESHSEC-PLAINTEXT", (sys.argv[1], 7001))
' "$(host_ip4 2)"
sleep 1
capture_stop plain
after=$(policy_drops)
assert_cmp "$(capture_count plain udp)" -ge 1 "plaintext UDP seen on the wire"
assert_cmp "$(stat -c %s "$rx" 2>/dev/null || echo 0)" -eq 0 "bytes delivered to host 2"
assert_cmp "$after" -gt "$before" "host 2 XFRM inbound policy drops"
kill "$udp_srv" 2>/dev/null || true
# Control: the same datagram from a non-member (host 6, no policies for it) arrives.
on 2 socat -u "UDP4-RECV:7002" "CREATE:$rx.control" &
udp_srv=$!
ledger_add "$BED_LEDGER" pid "$udp_srv"
wait_until 10 udp_bound 2 7002
on $((N + 1)) sh -c "echo CONTROL | socat -u - UDP4-SENDTO:$(host_ip4 2):7002"
wait_until 5 test -s "$rx.control"
kill "$udp_srv" 2>/dev/null || true
# The agent repairs a policy deleted by hand.
on 1 ip xfrm policy delete src "$(host_ip4 1)/32" dst "$(host_ip4 2)/32" dir out
repaired() { on 1 ip xfrm policy get src "$(host_ip4 1)/32" dst "$(host_ip4 2)/32" dir out; }
wait_until 10 repaired
assert on 1 ping -c1 -W3 -q "$(host_ip4 2)"
# An SA deleted by hand: the XFRM monitor's notification (not the 60 s
# resync) makes the agent re-read the kernel and re-key the link within a
# second; the link comes back.
missing() { grep -c 'installed SA missing from the kernel' "$(agent_log 1)" || true; }
seen=$(missing)
spi=$(xfrm_spis 1 "$(host_ip4 1)" "$(host_ip4 2)" | head -n1)
[[ -n $spi ]] || fail "no SA from host 1 to host 2"
deleted=$(on 1 sh -c "ip xfrm state delete src $(host_ip4 1) dst $(host_ip4 2) proto esp spi $spi && date -u +%Y-%m-%dT%H:%M:%S.%NZ") \
    || fail "the delete failed"
noticed() { (($(missing) > seen)); }
wait_until 10 noticed
found=$(grep 'installed SA missing from the kernel' "$(agent_log 1)" | tail -n1 | cut -d' ' -f1)
took_ms=$(awk -v a="$(date -d "$deleted" +%s.%N)" -v b="$(date -d "$found" +%s.%N)" 'BEGIN {printf "%d", (b - a) * 1000}')
log "SA $spi deleted by hand on host 1: the agent noticed after $took_ms ms"
assert_cmp "$took_ms" -le 1000 "ms from a hand delete to the agent's repair"
wait_until 30 all_established
assert on 1 ping -c1 -W3 -q "$(host_ip4 2)"
# No honest host ever found its own gossip record overwritten (the check
# that puts a forged one back must not fire on a real mesh).
for i in $(seq 1 $N); do
    assert_cmp "$(bedq "$i" status records own_record_restored)" -eq 0 "host $i own record restorations"
done
log "mesh-esp ($ESP_ALG) ok"
