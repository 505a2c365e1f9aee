#!/usr/bin/env bash
# needs: esp
# timeout: 600
# Join benchmark (issue 12; figures, not a test, run by testnet/bench-join):
# 5 agents started at once until keyed among themselves, then 7 more until
# all 12 are, then a 13th until it has SAs with all 12. Prints each phase's
# time from the agents' own logs, the 13th's split into gossip (until it
# lists all 12 alive, and until all 12 list it alive) and the rest.
. "$(dirname "$0")/../lib/bed.sh"

N=12 FIRST=5 NEW=13 hsf=
bed_up $NEW
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
FIGURES=$WORK/figures.txt
: >"$FIGURES"
figure() { log "FIGURE $*"; echo "$*" >>"$FIGURES"; }

start() { # start I
    local i=$1 seed=()
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" "${seed[@]}" >/dev/null
}
keyed() { # keyed PEERS HOST...: each HOST has both links (v4, v6) to PEERS peers established
    local peers=$1 i
    shift
    for i; do [[ $(established_links "$i") == $((peers * 2)) ]] || return 1; done
}
# The timestamp (first field) of the first / last line of the logs matching RE.
first_ts() { local re=$1; shift; grep -hE "$re" "$@" | cut -d' ' -f1 | sort | head -n1; }
last_ts() { local re=$1; shift; grep -hE "$re" "$@" | cut -d' ' -f1 | sort | tail -n1; }
# Seconds from timestamp A to timestamp B, one decimal.
span() { awk -v a="$(date -d "$1" +%s.%N)" -v b="$(date -d "$2" +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
logs() { local i; for i; do agent_log "$i"; done; }
INSTALLED='SAs and policies installed|responder session confirmed'
STARTED='agent started'

# 1. The first 5 at once (as mesh-esp does).
t=$SECONDS
for i in $(seq 1 $FIRST); do start "$i"; done
wait_until 180 keyed $((FIRST - 1)) $(seq 1 $FIRST)
polled=$((SECONDS - t))
first=$(first_ts "$STARTED" $(logs 1))
figure "first_5_keyed_s=$(span "$first" "$(last_ts "$INSTALLED" $(logs $(seq 1 $FIRST)))") (first start -> last link of the 5 installed; polled: ${polled} s)"

# 2. Seven more at once, until all 12 are keyed among themselves.
t=$SECONDS
for i in $(seq $((FIRST + 1)) $N); do start "$i"; done
wait_until 300 keyed $((N - 1)) $(seq 1 $N)
polled=$((SECONDS - t))
sixth=$(first_ts "$STARTED" $(logs $((FIRST + 1))))
figure "next_7_keyed_s=$(span "$sixth" "$(last_ts "$INSTALLED" $(logs $(seq 1 $N)))") (6th-12th start -> every link of the 12 installed; polled: ${polled} s)"

# 3. The 13th. Quiet first, so its figures are its own.
nap 5
t=$SECONDS
start $NEW
wait_until 180 keyed $N $NEW
polled=$((SECONDS - t))
wait_until 60 keyed $N $(seq 1 $N)
began=$(first_ts "$STARTED" $(logs $NEW))
figure "13th_keyed_s=$(span "$began" "$(last_ts "$INSTALLED" $(logs $NEW))") (its start -> SAs with all 12 installed on it; polled: ${polled} s)"
figure "13th_all_peers_keyed_s=$(span "$began" "$(last_ts "$INSTALLED" $(logs $(seq 1 $NEW)))") (its start -> last link to it installed on any host)"
# Gossip's part: when the 13th first listed each member alive, and each member
# the 13th (members flap between alive and suspect when the emulated machine
# is overloaded: the first time counts).
first_alive() { # first_alive PEER LOG: timestamp of LOG's first "PEER ... to=alive"
    grep -m1 -E "membership changed peer=$1 .*to=alive" "$2" | cut -d' ' -f1
}
saw=() seen=()
for i in $(seq 1 $N); do
    saw+=("$(first_alive "h$i" "$(agent_log $NEW)")")
    seen+=("$(first_alive "h$NEW" "$(agent_log "$i")")")
done
figure "13th_lists_12_alive_s=$(span "$began" "$(printf '%s\n' "${saw[@]}" | sort | tail -n1)") (gossip: its start -> it first listed the last of the 12 alive)"
figure "12_list_13th_alive_s=$(span "$began" "$(printf '%s\n' "${seen[@]}" | sort | tail -n1)") (gossip: its start -> the last of the 12 first listed it alive)"
figure "13th_first_link_s=$(span "$began" "$(first_ts "$INSTALLED" $(logs $NEW))") (its start -> its first link installed)"
flaps=$(cat $(logs $(seq 1 $NEW)) | awk -v b="$began" '$1 >= b && /membership changed .*to=(suspect|dead)/' | wc -l)
figure "load: $flaps times a member was listed suspect or dead after the 13th started (members flap when the emulated machine is overloaded)"
hs=$(agent_ctl $NEW status --json)
for k in established retransmits retransmit_answered timeouts unknown_peer collision_dropped collision_abandoned cookie_sent; do
    [[ $hs =~ \"$k\":([0-9]+) ]] && hsf+="$k=${BASH_REMATCH[1]} "
done
figure "13th handshake counters: ${hsf:-?}"
for i in $(seq 1 $NEW); do agent_ctl "$i" status --json >"$WORK/h$i/status.json"; done
log "join bench ok: $(tr '\n' ';' <"$FIGURES")"
