#!/usr/bin/env bash
# needs: none
# timeout: 180
# Issue 2 acceptance: 5 agents in 5 namespaces bootstrapped from ONE seed all
# list 5 alive members within 10 s; kill -9 of one is seen as dead within 15 s;
# its restart is alive again with the same fingerprint, listed once; an agent
# with a different secret never appears and its datagrams are dropped unparsed;
# `meshsec leave` announces a re-signed "left" and exits 0, and no agent ever
# counts a bad record signature; SIGTERM stops with exit 0.
. "$(dirname "$0")/../lib/bed.sh"

N=5
bed_up $((N + 1))
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null
"$MESHSEC_BIN" init --out "$WORK/foreign" 2>/dev/null
SEED="$(host_ip4 1):9340"

start() { # start I SECRET [extra args]
    local i=$1 secret=$2
    shift 2
    local seed=()
    ((i != 1)) && seed=(--seed "$SEED")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$secret" --node-name "h$i" --datapath memory "${seed[@]}" "$@"
}

count_state() { bedq "$1" count "$2"; }
state_of() { bedq "$1" state "$2"; }
all_see() { # all_see STATE COUNT HOSTS...: every host lists COUNT members in STATE
    local state=$1 want=$2 i
    shift 2
    for i in "$@"; do [[ $(count_state "$i" "$state") == "$want" ]] || return 1; done
}
all_say() { # all_say NAME STATE HOSTS...
    local name=$1 state=$2 i
    shift 2
    for i in "$@"; do [[ $(state_of "$i" "$name") == "$state" ]] || return 1; done
}

t0=$SECONDS
for i in $(seq 1 $N); do start "$i" "$WORK/secret"; done
start $((N + 1)) "$WORK/foreign"
wait_until 10 all_see alive $N $(seq 1 $N)
log "all $N agents list $N alive members after $((SECONDS - t0)) s"

fp5=$(bedq 1 member-field h5 fingerprint)
gen5=$(bedq 1 member-field h5 generation)

agent_kill9 5
t1=$SECONDS
wait_until 15 all_say h5 dead 1 2 3 4
log "h5 listed dead by all after $((SECONDS - t1)) s"

start 5 "$WORK/secret"
wait_until 10 all_say h5 alive 1 2 3 4 5
for i in 1 2 3 4 5; do
    assert_eq "$(listed "$i" h5)" 1 "h5 rows on host $i"
    assert_eq "$(bedq "$i" member-field h5 fingerprint)" "$fp5" "h5 fingerprint on host $i"
done
gen5b=$(bedq 1 member-field h5 generation)
assert_cmp "$gen5b" -gt "$gen5" "restarted h5 has a newer generation"

# The foreign agent: never listed anywhere, sees nobody, and its datagrams
# were dropped by the sealing layer before any parser.
for i in $(seq 1 $N); do
    assert_eq "$(state_of "$i" h6)" absent "foreign agent in host $i's listing"
done
assert_eq "$(bedq 6 count)" 1 "foreign agent's own listing"
dropped=$(agent_status 1 gossip dropped_unknown_key)
assert_cmp "$dropped" -gt 0 "foreign datagrams dropped by the seed's sealing layer (unknown key)"

# Graceful leave (`meshsec leave`): the agent exits 0 and peers list it as left.
agent_ctl 4 leave >/dev/null
leave_pid=${AGENT_PID[4]}
wait_until 10 bash -c "! kill -0 $leave_pid 2>/dev/null"
wait "$leave_pid"
leave_rc=$?
assert_eq "$leave_rc" 0 "agent 4 exit status after leave"
AGENT_PID[4]=
wait_until 10 all_say h4 left 1 2 3 5
# Every record was signed, the re-signed leave included: nothing was ever
# counted as a bad signature (proto/records.md).
for i in 1 2 3 5; do
    assert_eq "$(agent_status "$i" records records_bad_signature)" 0 "bad record signatures on host $i"
done
# A plain stop (SIGTERM) also exits 0; it is not a leave.
agent_stop 3
assert_eq "$AGENT_STATUS" 0 "agent 3 exit status after SIGTERM"
assert_eq "$(state_of 1 h3)" alive "h3 right after a stop (not announced as left)"
log "gossip-membership ok"
