#!/usr/bin/env bash
# needs: none
# timeout: 120
# Proves the agent_* helpers with a stand-in binary (a small bash script, not
# meshsec): it runs in the right namespace with its own state dir, socket and
# log, agent_ctl reaches it, bedq reaches the same socket (and, the answer not
# being the control API's, fails with one line naming what failed), agent_stop
# delivers SIGTERM and collects the exit status, agent_kill9 gives no chance to
# clean up, agent_restart reuses the arguments, and an agent that ignores
# SIGTERM fails agent_stop.
. "$(dirname "$0")/../lib/bed.sh"

bed_up 2
# The stand-in: "agent ARGS" serves one line per connection on the control
# socket ("<node-name> <pid> <netns inode>"); any other command connects to
# the socket named by --control-socket and prints the answer.
MESHSEC_BIN=$WORK/fake-meshsec
cat >"$MESHSEC_BIN" <<'EOF'
#!/usr/bin/env bash
set -u
opt() { local want=$1; shift; while (($#)); do [[ $1 == "$want" ]] && { echo "$2"; return; }; shift; done; }
if [[ $1 == agent ]]; then
    sock=$(opt --control-socket "$@") state=$(opt --state-dir "$@") name=$(opt --node-name "$@")
    echo "fake agent $$ args: $*"
    echo "started $$" >>"$state/starts"
    [[ ${FAKE_IGNORE_TERM:-0} == 1 || -e $state/ignore-term ]] && trap '' TERM || trap 'echo "SIGTERM"; exit 7' TERM
    socat "UNIX-LISTEN:$sock,fork,unlink-early" \
        "SYSTEM:echo $name $$ $(stat -L -c %i /proc/self/ns/net)" &
    while :; do sleep 0.2; done
else
    socat - "UNIX-CONNECT:$(opt --control-socket "$@")"
fi
EOF
chmod +x "$MESHSEC_BIN"

# serving I: the agent process the bed started on host I answers (a socket
# file alone could be left over from a killed predecessor).
serving() {
    local name pid
    read -r name pid _ <<<"$(agent_ctl "$1" ping)"
    [[ $pid == "${AGENT_PID[$1]}" ]]
}

agent_start 1 --node-name alpha --listen "$(host_ip4 1):9340"
agent_start 2 --node-name beta
wait_until 10 serving 1
wait_until 10 serving 2

read -r name pid ns <<<"$(agent_ctl 1 members --json)"
assert_eq "$name" alpha "name answered on host 1's control socket"
assert_eq "$pid" "${AGENT_PID[1]}" "agent pid tracked by the bed"
assert_eq "$ns" "$(on 1 stat -L -c %i /proc/self/ns/net)" "agent 1 runs in host 1's namespace"
refute test "$ns" = "$(stat -L -c %i /proc/self/ns/net)"
read -r name _ <<<"$(agent_ctl 2 status)"
assert_eq "$name" beta "name answered on host 2's control socket"
# bedq: the typed client reaches host 1's socket and rejects the stand-in's answer.
if bedq 1 count >"$WORK/bedq.out" 2>"$WORK/bedq.err"; then
    fail "bedq accepted the stand-in's answer: $(<"$WORK/bedq.out")"
fi
assert_eq "$(wc -l <"$WORK/bedq.err")" 1 "bedq error lines"
assert grep -qF "bed_query: members from $(agent_socket 1): " "$WORK/bedq.err"
assert grep -q -- "--state-dir $(agent_state_dir 1) --control-socket $(agent_socket 1) --node-name alpha --listen $(host_ip4 1):9340" "$(agent_log 1)"

# SIGTERM: the stand-in exits 7 on it, and agent_stop reports that status.
agent_stop 1
assert_eq "$AGENT_STATUS" 7 "exit status collected by agent_stop"
assert grep -q SIGTERM "$(agent_log 1)"
refute agent_running 1

# Restart with the same arguments.
agent_restart 1
wait_until 10 serving 1
assert_eq "$(agent_ctl 1 ping | cut -d' ' -f1)" alpha "restarted agent's name"
assert_eq "$(grep -c started "$(agent_state_dir 1)/starts")" 2 "starts recorded in host 1's state dir"

# SIGKILL: no trap runs, nothing is logged.
agent_kill9 2
refute agent_running 2
refute grep -q SIGTERM "$(agent_log 2)"

# An agent that ignores SIGTERM makes agent_stop fail (in a subshell, so the
# failure is observed here rather than ending this scenario).
touch "$(agent_state_dir 2)/ignore-term"
agent_restart 2
wait_until 10 serving 2
if (AGENT_STOP_TIMEOUT=1 agent_stop 2) 2>"$WORK/stop2.err"; then
    fail "agent_stop succeeded on an agent that ignores SIGTERM"
fi
assert grep -q "ignored SIGTERM" "$WORK/stop2.err"
log "agent helpers ok"
