#!/usr/bin/env bash
# needs: esp
# timeout: 300
# Issue 13 acceptance for `meshsec doctor` on a 4-host ESP mesh (IPv4 and
# IPv6): every check passes on every host of the healthy mesh (exit 0); with
# ESP (IP protocol 50) dropped on host 4's ingress (tc), doctor on host 1
# fails exactly one check, ESP from h4 (exit 1, text and --json); with host
# 3's gossip UDP dropped, doctor on host 1 fails exactly one check, gossip
# from h3. The skewed-clock case is a unit test (a namespace cannot skew its
# clock). The agents' logs (files, not a TTY) carry no ANSI escape.
. "$(dirname "$0")/../lib/bed.sh"

N=4
bed_up $N
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null

# The agent's flags of host I (doctor takes the same ones).
flags() {
    local i=$1 seed=()
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    echo --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" "${seed[@]}"
}
# doctor I [ARGS...]: meshsec doctor on host I with its agent's flags; output
# in $WORK/doctor-hI-<n>.txt, exit status in DOCTOR_RC.
DOCTOR_RUNS=0
doctor() {
    local i=$1
    shift
    DOCTOR_RUNS=$((DOCTOR_RUNS + 1))
    DOCTOR_OUT=$WORK/doctor-h$i-$DOCTOR_RUNS.txt
    DOCTOR_RC=0
    # shellcheck disable=SC2046
    on "$i" "$MESHSEC_BIN" doctor --state-dir "$(agent_state_dir "$i")" \
        --control-socket "$(agent_socket "$i")" $(flags "$i") --sample-secs 2 "$@" \
        >"$DOCTOR_OUT" 2>"$DOCTOR_OUT.err" || DOCTOR_RC=$?
}
failed_lines() { grep '^✘' "$DOCTOR_OUT" || true; }
all_established() {
    local i
    for i in $(seq 1 $N); do [[ $(established_links "$i") == $(((N - 1) * 2)) ]] || return 1; done
}

for i in $(seq 1 $N); do
    # shellcheck disable=SC2046
    agent_start "$i" $(flags "$i")
done
wait_until 90 all_established
log "4-host mesh established (6 links per host)"

# Healthy: all ✔ on every host.
for i in $(seq 1 $N); do
    doctor "$i"
    [[ $DOCTOR_RC == 0 ]] || fail "doctor on host $i exited $DOCTOR_RC on a healthy mesh: $(failed_lines) $(<"$DOCTOR_OUT.err")"
    assert_eq "$(failed_lines)" "" "doctor's failed checks on host $i"
    # kernel, esp_offload, config, agent, permissions, 3 clocks, 3 gossip, 3 handshake, 3 esp, 2 mtu, policies
    assert_eq "$(grep -c '^✔' "$DOCTOR_OUT")" 20 "doctor's passed checks on host $i"
done
log "healthy mesh: doctor passes all 20 checks (esp_offload included) on each of the 4 hosts; host 1 says:"
sed 's/^/    /' "$WORK/doctor-h1-1.txt"
for c in kernel config agent permissions mtu policies; do
    assert grep -q "^✔ $c: " "$WORK/doctor-h1-1.txt"
done
for p in h2 h3 h4; do
    for c in clock gossip handshake esp; do assert grep -q "^✔ $c $p: " "$WORK/doctor-h1-1.txt"; done
done

# ESP filtered on host 4 (ingress, IPv4 and IPv6): the handshakes and gossip
# still pass, ESP to host 4 is lost, so nothing comes back from it.
on 4 tc qdisc add dev eth0 clsact
on 4 tc filter add dev eth0 ingress protocol ip u32 match ip protocol 50 0xff action drop
on 4 tc filter add dev eth0 ingress protocol ipv6 u32 match ip6 protocol 50 0xff action drop
log "host 4: ESP (IP protocol 50) dropped on ingress"
doctor 1
assert_eq "$DOCTOR_RC" 1 "doctor's exit status on host 1 with ESP filtered at host 4"
log "doctor on host 1: $(failed_lines)"
assert_eq "$(failed_lines | wc -l)" 1 "doctor's failed checks on host 1"
assert failed_lines | grep -q '^✘ esp h4: ESP (IP protocol 50) from h4 is not arriving: .*none received; fix: allow IP protocol 50'
doctor 1 --json
assert_eq "$DOCTOR_RC" 1 "doctor --json exit status"
assert_eq "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["ok"], [(c["name"], c.get("peer")) for c in r["checks"] if not c["ok"]])' "$DOCTOR_OUT")" \
    "False [('esp', 'h4')]" "doctor --json failures"
on 4 tc qdisc del dev eth0 clsact
log "host 4: ESP passes again"

# Gossip blocked for host 3 (UDP 9340 both ways); its links stay up within
# the peer grace period, so only gossip fails, once host 3 has been silent
# for longer than doctor's 10 s.
on 3 tc qdisc add dev eth0 clsact
on 3 tc filter add dev eth0 ingress protocol ip u32 match ip protocol 17 0xff match ip dport 9340 0xffff action drop
on 3 tc filter add dev eth0 egress protocol ip u32 match ip protocol 17 0xff match ip dport 9340 0xffff action drop
log "host 3: gossip UDP dropped"
silent_h3() { [[ $(bedq 1 member-field h3 last_heard_ms) -gt 11000 ]]; }
wait_until 30 silent_h3
doctor 1
assert_eq "$DOCTOR_RC" 1 "doctor's exit status on host 1 with host 3's gossip blocked"
log "doctor on host 1: $(failed_lines)"
assert_eq "$(failed_lines | wc -l)" 1 "doctor's failed checks on host 1"
assert failed_lines | grep -q '^✘ gossip h3: .*no gossip from h3 (192.0.2.13:9340) for [0-9]* s; fix: allow UDP port 9340 both ways between this host and h3'
on 3 tc qdisc del dev eth0 clsact

# Item 5: what the agents logged (membership and link changes) went to a
# file, not a TTY: plain text, no colour codes.
for i in $(seq 1 $N); do
    assert grep -q 'membership changed' "$(agent_log "$i")"
    refute grep -q $'\x1b' "$(agent_log "$i")"
done
log "doctor ok: all ✔ on a healthy mesh; ESP filtered at h4 and gossip blocked at h3 each named by the one failed check; agent logs free of ANSI escapes"
