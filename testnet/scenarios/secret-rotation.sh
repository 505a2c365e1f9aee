#!/usr/bin/env bash
# needs: esp
# timeout: 900
# Secret rotation across 5 hosts by rolling restarts, as docs/operators.md
# describes (old+new, new+old, new only), under a sequence-numbered UDP flow
# and one long-lived TCP connection from host 1 to host 2 (flow_start/
# flow_check; both hosts' agents restart three times under them): not one
# datagram lost, the connection neither resets nor stalls for more than 1 s,
# no member ever missing from (or left in) the listing, and at the end every
# pair is established under the new secret alone while a host holding only
# the old secret can no longer join.
. "$(dirname "$0")/../lib/bed.sh"

N=5
bed_up $((N + 1))
"$MESHSEC_BIN" init --out "$WORK/old" 2>/dev/null
"$MESHSEC_BIN" init --out "$WORK/new" 2>/dev/null
start() { # start I SECRET-FILES...
    local i=$1 seed=() f secrets=()
    shift
    for f in "$@"; do secrets+=(--secret-file "$WORK/$f"); done
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    ((i == 1)) && seed=(--seed "$(host_ip4 2):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --node-name "h$i" --data-address "$(host_ip4 "$i")" \
        "${secrets[@]}" "${seed[@]}"
}
restart() { # restart I SECRET-FILES...: SIGTERM (SAs stay), start again
    local i=$1
    shift
    agent_stop "$i" >/dev/null
    start "$i" "$@"
    wait_until 60 established_on "$i"
}
established_on() { # all N-1 links of host I established
    [[ $(established_links "$1") == $((N - 1)) ]]
}
all_established() { local i; for i in $(seq 1 $N); do established_on "$i" || return 1; done; }

for i in $(seq 1 $N); do start "$i" old; done
wait_until 120 all_established
log "5-host mesh established under the old secret"

# Watch every host's listing throughout: every member present, none left.
listings_start $N

flow_start 1 2
sleep 2

# A pause after each round, as an operator's rollout has: the listing
# watch samples only agents up 10 s or more (a fresh one knows only itself),
# and a fast round restarts every host within 10 s.
for i in $(seq 1 $N); do restart "$i" old new; done
log "step 2 done: every host opens both, seals with the old"
sleep 6
for i in $(seq 1 $N); do restart "$i" new old; done
log "step 3 done: every host seals with the new"
sleep 6
for i in $(seq 1 $N); do restart "$i" new; done
log "step 4 done: the old secret is gone everywhere"
sleep 6
wait_until 60 all_established

# The rotation is over: stop and check the flows.
flow_check
listings_stop $N

# A host with only the old secret cannot join any more.
start 6 old
sleep 8
for i in $(seq 1 $N); do
    assert_eq "$(listed "$i" h6)" 0 "h6 (old secret) in host $i's listing"
done

log "secret-rotation ok"
