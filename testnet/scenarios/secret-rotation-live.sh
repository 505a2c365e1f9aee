#!/usr/bin/env bash
# needs: esp
# timeout: 600
# Secret rotation across 5 hosts without a restart, as docs/operators.md
# describes: each host's secret file holds its keyring (one secret per line),
# edited in three rounds (old+new, new+old, new only) with `meshsec reload`
# after each edit, under the UDP flow and the long-lived TCP connection.
# Asserted: not one datagram lost, no TCP stall over 1 s, no agent restarted,
# no member ever missing from any listing, no gossip datagram dropped for an
# unknown key or a bad tag during the rotation, handshakes work under the new
# secret alone (a forced re-key completes), a reload of a broken file fails
# with a message naming the line and changes nothing, host 5 reloads by
# SIGHUP in every round, no handshake is rejected for its mac1, and
# a host holding only the old secret can no longer join.
. "$(dirname "$0")/../lib/bed.sh"

N=5
bed_up $((N + 1))
"$MESHSEC_BIN" init --out "$WORK/old" 2>/dev/null
"$MESHSEC_BIN" init --out "$WORK/new" 2>/dev/null
ring() { # ring I SECRET-FILES...: writes host I's keyring file (first seals)
    local i=$1 f
    shift
    (umask 077 && for f in "$@"; do cat "$WORK/$f"; echo; done >"$WORK/h$i.ring.tmp")
    mv "$WORK/h$i.ring.tmp" "$WORK/h$i.ring"
}
start() {
    local i=$1 seed=(--seed "$(host_ip4 1):9340")
    ((i == 1)) && seed=(--seed "$(host_ip4 2):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --node-name "h$i" --data-address "$(host_ip4 "$i")" \
        --secret-file "$WORK/h$i.ring" "${seed[@]}"
}
established_on() {
    [[ $(established_links "$1") == $((N - 1)) ]]
}
all_established() { local i; for i in $(seq 1 $N); do established_on "$i" || return 1; done; }
reloads_logged() { grep -c 'cluster secret keyring reloaded' "$(agent_log "$1")" || true; }
rotate() { # rotate SECRET-FILES...: every host, one after the other (host 5 by SIGHUP)
    local i n
    for i in $(seq 1 $N); do
        ring "$i" "$@"
        if ((i == N)); then
            n=$(reloads_logged "$i")
            kill -HUP "${AGENT_PID[$i]}"
            wait_until 30 eval "(( \$(reloads_logged $i) > n ))"
            [[ $(grep 'cluster secret keyring reloaded' "$(agent_log "$i")" | tail -n1) == *"secrets=$# "* ]] ||
                fail "host $i's SIGHUP reload did not load $# secret(s)"
        else
            agent_ctl "$i" reload >>"$WORK/reloads.txt" || fail "meshsec reload on host $i failed"
        fi
    done
}

for i in $(seq 1 $N); do ring "$i" old; start "$i"; done
wait_until 120 all_established
log "5-host mesh established under the old secret"
declare -A pid_before
for i in $(seq 1 $N); do pid_before[$i]=${AGENT_PID[$i]}; done

listings_start $N

flow_start 1 2
sleep 2

# A broken edit is refused, names the line, and changes nothing.
printf '%s\nnot-a-secret\n' "$(cat "$WORK/old")" >"$WORK/h3.ring"
if agent_ctl 3 reload >"$WORK/bad-reload.txt" 2>&1; then fail "reload of a broken keyring file succeeded"; fi
grep -q "line 2" "$WORK/bad-reload.txt" || fail "the refused reload does not name the line: $(cat "$WORK/bad-reload.txt")"
assert_eq "$(reloads_logged 3)" 0 "keyring reloads on host 3 after the refused one"
log "broken keyring refused: $(cat "$WORK/bad-reload.txt")"
ring 3 old

rotate old new
log "round 1 done: every host opens both, seals with the old"
sleep 5 # gossip and traffic under this keyring before the next round
rotate new old
log "round 2 done: every host seals with the new"
sleep 5 # gossip and traffic under this keyring before the next round
rotate new
log "round 3 done: the old secret is gone everywhere"
sleep 5 # gossip and traffic under this keyring before the next round
sort "$WORK/reloads.txt" | uniq -c | while read -r line; do log "reload replies: $line"; done
# Handshakes under the new secret alone: a forced re-key of every link of host 1.
before=$(agent_status 1 mesh sessions_established)
agent_ctl 1 rekey >/dev/null
more() { (($(agent_status 1 mesh sessions_established) >= before + N - 1)); }
wait_until 60 more
wait_until 60 all_established
log "host 1 re-keyed its $((N - 1)) links under the new secret"
sleep 2
flow_check
listings_stop $N 'left|dead'

for i in $(seq 1 $N); do
    assert_eq "${AGENT_PID[$i]}" "${pid_before[$i]}" "host $i agent pid (no restart)"
    agent_running "$i" || fail "host $i's agent is not running"
    assert_eq "$(agent_status "$i" gossip dropped_unknown_key)" 0 "host $i gossip datagrams dropped for an unknown key"
    assert_eq "$(agent_status "$i" gossip dropped_bad_tag)" 0 "host $i gossip datagrams dropped for a bad tag"
    assert_eq "$(agent_status "$i" handshake bad_mac)" 0 "host $i handshakes rejected for a bad mac1"
done

# A host with only the old secret cannot join any more.
ring 6 old
start 6
sleep 8
for i in $(seq 1 $N); do
    assert_eq "$(listed "$i" h6)" 0 "h6 (old secret) in host $i's listing"
done
log "secret-rotation-live ok"
