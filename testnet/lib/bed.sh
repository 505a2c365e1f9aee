# shellcheck shell=bash
# The test bed, sourced by every scenario:
#
#   . "$(dirname "$0")/../lib/bed.sh"
#   bed_up 3                 # hosts 1..3 as network namespaces on one bridge
#   on 1 ping -c1 "$(host_ip4 2)"
#
# Host i lives in its own network namespace with eth0 = 192.0.2.(10+i)/24 and
# 2001:db8::(10+i)/64 (no DAD, usable at once), lo up and no default route.
# All hosts hang off one bridge in the caller's namespace, in hub mode (frames
# are flooded, so a capture on the bridge sees every packet exactly once).
#
# Everything the bed creates is written to a ledger and removed by an EXIT trap,
# on success, failure, timeout (SIGTERM) or Ctrl-C alike.
#
# Environment (set by testnet/run; defaults make a scenario runnable by hand):
#   MESHSEC_BIN   the binary agent_* runs (default: REPO/target/release/meshsec)
#   MESHSEC_BED_QUERY  the typed control-API client bedq runs (examples/bed_query.rs;
#                 default: REPO/target/release/examples/bed_query)
#   MESHSEC_WORK  this scenario's folder for logs, state and captures
#   MESHSEC_BED_ID  short unique id used in namespace and interface names

set -Eeuo pipefail

BED_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$BED_LIB_DIR/ledger.sh"

BED_REPO=$(cd "$BED_LIB_DIR/../.." && pwd)
MESHSEC_BIN=${MESHSEC_BIN:-$BED_REPO/target/release/meshsec}
MESHSEC_BED_QUERY=${MESHSEC_BED_QUERY:-$BED_REPO/target/release/examples/bed_query}
# Interface names are limited to 15 bytes: "mv" + id + "h" + index must fit.
BED_ID=${MESHSEC_BED_ID:-$$}
if [[ -z ${MESHSEC_WORK:-} ]]; then
    MESHSEC_WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshsec-bed.XXXXXX")
    echo "bed: work folder $MESHSEC_WORK" >&2
fi
WORK=$MESHSEC_WORK
mkdir -p "$WORK"
BED_LEDGER=$WORK/.bed-ledger
# Unix socket paths are limited to 108 bytes and the work folder can be deep,
# so control sockets live in a short folder of their own.
BED_SOCK_DIR=/tmp/msb$BED_ID
BED_BRIDGE=mb$BED_ID
BED_N=0
BED_HUB=${BED_HUB:-1}
declare -A AGENT_PID=() AGENT_ARGS=() CAPTURE_PID=()
BED_PARTITIONS=()
BED_CLEANED=0
# Only the scenario's own shell cleans up: an EXIT trap inherited by a
# subshell (a command substitution that failed) must not tear the bed down.
BED_MAIN_PID=$BASHPID

mkdir -p "$BED_SOCK_DIR"
ledger_add "$BED_LEDGER" dir "$BED_SOCK_DIR"
# Every command the scenario and the bed run, timestamped, for post-mortems.
# Written to local disk (one write per line would be a 9p round trip each in
# the VM) and saved into WORK when the bed is torn down.
if [[ ${MESHSEC_BED_TRACE:-1} == 1 ]]; then
    ledger_add "$BED_LEDGER" save "$BED_SOCK_DIR/trace.log"
    exec {BASH_XTRACEFD}>>"$BED_SOCK_DIR/trace.log"
    PS4='+ ${EPOCHREALTIME} ${BASH_SOURCE[0]##*/}:${LINENO} '
    set -x
fi

# A sleep without exec'ing /bin/sleep: read with a timeout on a pipe that
# never delivers.
exec {BED_NAP_FD}<> <(:)
nap() { read -r -t "$1" -u "$BED_NAP_FD" _ || true; }

log() { printf '%(%H:%M:%S)T %s\n' -1 "$*"; }
fail() {
    printf '%(%H:%M:%S)T FAIL: %s\n' -1 "$*" >&2
    exit 1
}

bed__on_err() {
    local rc=$? k where=
    # Name the scenario's line first, then the helpers it went through.
    for ((k = ${#FUNCNAME[@]} - 1; k >= 1; k--)); do
        where+="${where:+ > }${BASH_SOURCE[k]##*/}:${BASH_LINENO[k-1]}"
        [[ ${FUNCNAME[k-1]} != bed__on_err ]] && where+="(${FUNCNAME[k-1]})"
    done
    printf '%(%H:%M:%S)T error: "%s" exited %s at %s\n' -1 "$BASH_COMMAND" "$rc" "$where" >&2
}
trap bed__on_err ERR
trap bed_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- hosts -------------------------------------------------------------------

bed_ns() { echo "ms$BED_ID-h$1"; }
host_ip4() { echo "192.0.2.$((10 + $1))"; }
host_ip6() { echo "2001:db8::$((10 + $1))"; }
# The host-side (bridge port) end of host i's link.
bed_port() { echo "mv${BED_ID}h$1"; }

# on I CMD...: runs CMD inside host I's namespace.
on() {
    local i=$1
    shift
    ip netns exec "$(bed_ns "$i")" "$@"
}

# bed_up N: creates hosts 1..N (may be called again to add hosts).
# Few processes on purpose: in the VM every exec reads its binary over 9p.
bed_up() {
    local n=$1 i ns port root_cmds=
    if [[ ! -e /sys/class/net/$BED_BRIDGE ]]; then
        ledger_add "$BED_LEDGER" link "$BED_BRIDGE"
        ip link add "$BED_BRIDGE" type bridge
        # Ageing 0 = never learn = flood every frame: the bridge acts as a hub
        # and tcpdump on it sees all traffic between hosts.
        if [[ $BED_HUB == 1 ]]; then
            ip link set "$BED_BRIDGE" type bridge ageing_time 0
        fi
        echo 1 >"/proc/sys/net/ipv6/conf/$BED_BRIDGE/disable_ipv6" 2>/dev/null || true
        ip link set "$BED_BRIDGE" up
    fi
    for ((i = BED_N + 1; i <= n; i++)); do
        ns=$(bed_ns "$i") port=$(bed_port "$i")
        ledger_add "$BED_LEDGER" netns "$ns"
        ledger_add "$BED_LEDGER" link "$port"
        ip netns add "$ns"
        # The peer is born inside the namespace, already named eth0.
        root_cmds+="link add $port type veth peer name eth0 netns $ns
link set $port master $BED_BRIDGE
link set $port up
"
        mkdir -p "$WORK/h$i"
    done
    [[ -z $root_cmds ]] || ip -batch - <<<"$root_cmds"
    for ((i = BED_N + 1; i <= n; i++)); do
        # nodad: usable at once instead of "tentative" for a second or more.
        ip -n "$(bed_ns "$i")" -batch - <<EOF
link set lo up
addr add $(host_ip4 "$i")/24 dev eth0
addr add $(host_ip6 "$i")/64 dev eth0 nodad
link set eth0 up
EOF
    done
    BED_N=$n
    log "bed: $n hosts up (ids ms$BED_ID-h1..h$n, bridge $BED_BRIDGE)"
}

# on_bg I CMD...: CMD in host I in the background; its PID in $BG_PID (and in
# the ledger). Prefer this to "on I CMD &", whose $! is a bash subshell that
# ignores SIGINT (bash starts a script's background jobs so) and passes no
# signal on: "kill -INT $!" would do nothing and "wait" would hang. CMD also
# gets the default SIGINT/SIGQUIT disposition back.
on_bg() {
    local i=$1
    shift
    ip netns exec "$(bed_ns "$i")" env --default-signal=INT,QUIT "$@" &
    BG_PID=$!
    ledger_add "$BED_LEDGER" pid "$BG_PID"
}

# bg_stop PID [SIGNAL]: signal (default INT) a background job, wait up to 5 s
# for it to exit, then SIGKILL it. Returns its exit status.
bg_stop() {
    local pid=$1 sig=${2:-INT} t rc=0
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((t = 0; t < 50; t++)); do
        kill -0 "$pid" 2>/dev/null || break
        nap 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "bg_stop: $pid ignored SIG$sig for 5 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

# --- agents ------------------------------------------------------------------

agent_socket() { echo "$BED_SOCK_DIR/h$1.sock"; }
agent_state_dir() { echo "$WORK/h$1/state"; }
agent_log() { echo "$WORK/h$1/agent.log"; }

# agent_start I ARGS...: "$MESHSEC_BIN agent --state-dir D --control-socket S
# ARGS..." in host I, in the background, output appended to its log.
agent_start() {
    local i=$1
    shift
    [[ -x $MESHSEC_BIN ]] || fail "MESHSEC_BIN=$MESHSEC_BIN is not executable (did the crate build?)"
    if [[ -n ${AGENT_PID[$i]:-} ]] && kill -0 "${AGENT_PID[$i]}" 2>/dev/null; then
        fail "agent_start $i: an agent is already running there (pid ${AGENT_PID[$i]})"
    fi
    AGENT_ARGS[$i]=$(printf '%q ' "$@")
    mkdir -p "$(agent_state_dir "$i")"
    echo "=== $(date +%T.%N) agent_start $i: $*" >>"$(agent_log "$i")"
    # ip netns exec execs the agent, so $! is the agent itself.
    ip netns exec "$(bed_ns "$i")" env RUST_BACKTRACE=1 "$MESHSEC_BIN" agent \
        --state-dir "$(agent_state_dir "$i")" --control-socket "$(agent_socket "$i")" "$@" \
        >>"$(agent_log "$i")" 2>&1 &
    AGENT_PID[$i]=$!
    ledger_add "$BED_LEDGER" pid "${AGENT_PID[$i]}"
    log "agent $i started (pid ${AGENT_PID[$i]})"
}

# agent_stop I: SIGTERM and wait; fails if the agent ignores it for
# AGENT_STOP_TIMEOUT seconds (default 10), then kills it.
agent_stop() {
    local i=$1 pid=${AGENT_PID[$1]:-} t rc=0
    [[ -n $pid ]] || fail "agent_stop $i: no agent started on host $i"
    kill -TERM "$pid" 2>/dev/null || true
    for ((t = 0; t < ${AGENT_STOP_TIMEOUT:-10} * 10; t++)); do
        kill -0 "$pid" 2>/dev/null || break
        nap 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        AGENT_PID[$i]=
        fail "agent $i ignored SIGTERM for ${AGENT_STOP_TIMEOUT:-10} s"
    fi
    wait "$pid" 2>/dev/null || rc=$?
    AGENT_PID[$i]=
    echo "=== $(date +%T.%N) agent_stop $i: exit status $rc" >>"$(agent_log "$i")"
    log "agent $i stopped (exit status $rc)"
    AGENT_STATUS=$rc
}

# agent_kill9 I: SIGKILL, no chance to clean up (crash simulation).
agent_kill9() {
    local i=$1 pid=${AGENT_PID[$1]:-}
    [[ -n $pid ]] || fail "agent_kill9 $i: no agent started on host $i"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    AGENT_PID[$i]=
    echo "=== $(date +%T.%N) agent_kill9 $i" >>"$(agent_log "$i")"
    log "agent $i killed with SIGKILL"
}

# agent_restart I [ARGS...]: stop (if running) and start again, with the
# previous arguments unless new ones are given.
agent_restart() {
    local i=$1
    shift
    if [[ -n ${AGENT_PID[$i]:-} ]]; then agent_stop "$i"; fi
    if (($#)); then
        agent_start "$i" "$@"
    else
        eval "agent_start $i ${AGENT_ARGS[$i]:-}"
    fi
}

agent_running() { [[ -n ${AGENT_PID[$1]:-} ]] && kill -0 "${AGENT_PID[$1]}" 2>/dev/null; }

# agent_ctl I ARGS...: "$MESHSEC_BIN ARGS --control-socket S" in host I.
agent_ctl() {
    local i=$1
    shift
    on "$i" "$MESHSEC_BIN" "$@" --control-socket "$(agent_socket "$i")"
}

# bedq I QUERY [ARG...]: asks host I's agent through the library's own typed
# control client (examples/bed_query.rs) and prints one plain value; a change
# to the control API's shape breaks its build, not a scenario in the VM.
# Queries: status KEY... | established-links | count [STATE] | listed NAME |
# state NAME (or "absent") | member-field NAME FIELD | states.
bedq() {
    local i=$1
    shift
    [[ -x $MESHSEC_BED_QUERY ]] || fail "MESHSEC_BED_QUERY=$MESHSEC_BED_QUERY is not executable (cargo build --release --example bed_query)"
    on "$i" "$MESHSEC_BED_QUERY" --control-socket "$(agent_socket "$i")" "$@"
}

# agent_status I KEY...: one value of host I's status, e.g.
# agent_status 1 mesh rekeys_started.
agent_status() {
    local i=$1
    shift
    bedq "$i" status "$@"
}

# established_links I: how many links host I's listing shows established.
established_links() { bedq "$1" established-links; }

# listed I NAME: how many members named NAME host I's listing shows.
listed() { bedq "$1" listed "$2"; }

# --- network conditions -----------------------------------------------------

# netem I "SPEC": e.g. netem 2 "delay 50ms loss 1%" (SPEC is split on spaces).
netem() {
    local i=$1
    # shellcheck disable=SC2086
    on "$i" tc qdisc replace dev eth0 root netem $2
    log "netem host $i: $2"
}
netem_clear() { on "$1" tc qdisc del dev eth0 root 2>/dev/null || true; }

# A partition pins the peer's addresses to a MAC no host has, in both hosts'
# neighbour tables: packets leave but are silently lost, like a real cut,
# without needing netfilter in either kernel.
BED_BLACKHOLE_MAC=02:00:00:00:00:00
partition() {
    local i=$1 j=$2
    on "$i" ip neigh replace "$(host_ip4 "$j")" lladdr $BED_BLACKHOLE_MAC dev eth0 nud permanent
    on "$i" ip -6 neigh replace "$(host_ip6 "$j")" lladdr $BED_BLACKHOLE_MAC dev eth0 nud permanent
    on "$j" ip neigh replace "$(host_ip4 "$i")" lladdr $BED_BLACKHOLE_MAC dev eth0 nud permanent
    on "$j" ip -6 neigh replace "$(host_ip6 "$i")" lladdr $BED_BLACKHOLE_MAC dev eth0 nud permanent
    BED_PARTITIONS+=("$i $j")
    log "partition $i <-> $j"
}
# isolate I: partition I from every other host.
isolate() {
    local j
    for ((j = 1; j <= BED_N; j++)); do
        [[ $j == "$1" ]] || partition "$1" "$j"
    done
}
# heal [I J]: undo one partition, or all of them.
heal() {
    local p i j keep=()
    for p in "${BED_PARTITIONS[@]}"; do
        read -r i j <<<"$p"
        if (($# == 0)) || [[ ($i == "$1" && $j == "$2") || ($i == "$2" && $j == "$1") ]]; then
            on "$i" ip neigh del "$(host_ip4 "$j")" dev eth0 2>/dev/null || true
            on "$i" ip -6 neigh del "$(host_ip6 "$j")" dev eth0 2>/dev/null || true
            on "$j" ip neigh del "$(host_ip4 "$i")" dev eth0 2>/dev/null || true
            on "$j" ip -6 neigh del "$(host_ip6 "$i")" dev eth0 2>/dev/null || true
        else
            keep+=("$p")
        fi
    done
    BED_PARTITIONS=("${keep[@]}")
    log "heal ${*:-all}"
}

# --- captures ---------------------------------------------------------------

# capture_start NAME [FILTER...]: tcpdump on the bridge into WORK/NAME.pcap.
capture_start() {
    local name=$1 pid t
    shift
    # Created before tcpdump starts: reading a log the background job has not
    # created yet would fail the scenario (a race seen under load).
    : >"$WORK/$name.tcpdump.log"
    tcpdump -i "$BED_BRIDGE" -n -s 0 -U -Z root -w "$WORK/$name.pcap" "$@" \
        >>"$WORK/$name.tcpdump.log" 2>&1 &
    pid=$!
    CAPTURE_PID[$name]=$pid
    ledger_add "$BED_LEDGER" pid "$pid"
    # Packets sent before tcpdump has attached would be missed.
    for ((t = 0; t < 100; t++)); do
        [[ $(<"$WORK/$name.tcpdump.log") == *"listening on"* ]] && break
        kill -0 "$pid" 2>/dev/null || fail "tcpdump for $name died: $(<"$WORK/$name.tcpdump.log")"
        nap 0.1
    done
    log "capture $name started"
}

# capture_stop [NAME]: stops one capture (or all) and flushes the file.
capture_stop() {
    local name pid
    for name in "${@:-${!CAPTURE_PID[@]}}"; do
        pid=${CAPTURE_PID[$name]:-}
        [[ -n $pid ]] || continue
        kill -INT "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        unset "CAPTURE_PID[$name]"
        log "capture $name stopped: $(grep -h 'packets captured' "$WORK/$name.tcpdump.log" || echo '?')"
    done
}
capture_file() { echo "$WORK/$1.pcap"; }
# capture_count NAME FILTER...: packets in the capture matching a pcap filter.
capture_count() {
    local name=$1
    shift
    tcpdump -r "$WORK/$name.pcap" -n "$@" 2>/dev/null | wc -l
}

# --- assertions and waiting ----------------------------------------------------

# wait_until TIMEOUT_S CMD...: polls CMD (quietly) until it succeeds.
wait_until() {
    local timeout=$1 deadline
    shift
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        "$@" >/dev/null 2>&1 && return 0
        nap 0.2
    done
    "$@" && return 0
    fail "timed out after ${timeout}s waiting for: $*"
}

# tcp_listening I PORT: something listens on TCP PORT in host I.
tcp_listening() {
    [[ -n $(on "$1" ss -Hltn "sport = :$2") ]]
}
# tcp_established I PORT: host I has an established TCP connection to remote PORT.
tcp_established() {
    [[ -n $(on "$1" ss -Htn state established "dport = :$2") ]]
}
# udp_bound I PORT: something has UDP PORT bound in host I.
udp_bound() {
    [[ -n $(on "$1" ss -Hlun "sport = :$2") ]]
}

# assert CMD...: fails the scenario unless CMD succeeds.
assert() {
    "$@" || fail "assertion failed: $*"
}
# refute CMD...: fails the scenario if CMD succeeds.
refute() {
    ! "$@" || fail "expected to fail but succeeded: $*"
}
assert_eq() {
    [[ $1 == "$2" ]] || fail "${3:-values differ}: got '$1', expected '$2'"
}
# assert_cmp A OP B [MSG]: numeric comparison, OP one of -eq -ne -lt -le -gt -ge.
assert_cmp() {
    test "$1" "$2" "$3" || fail "${4:-comparison failed}: $1 $2 $3"
}

# --- traffic under test -----------------------------------------------------------

# flow_start SRC DST: the two probes issue 5 asks of every lifecycle run, from
# host SRC to host DST over IPv4 (lib/flow.py): a sequence-numbered UDP flow
# (a datagram every 10 ms, port 7100) and one long-lived TCP connection (a
# line every 20 ms, echoed, port 7101). They run until flow_check stops them,
# so they span exactly the phases in between (FLOW_MAX_SECS, default 3600, is
# only a backstop).
flow_start() {
    local src=$1 dst=$2 py=$BED_LIB_DIR/flow.py cap=${FLOW_MAX_SECS:-3600}
    on_bg "$dst" python3 "$py" udp-server 7100 "$cap" >"$WORK/flow-udp-server.txt" 2>&1
    FLOW_UDP_SRV=$BG_PID
    on_bg "$dst" python3 "$py" tcp-server 7101 >"$WORK/flow-tcp-server.txt" 2>&1
    FLOW_TCP_SRV=$BG_PID
    wait_until 10 udp_bound "$dst" 7100
    wait_until 10 tcp_listening "$dst" 7101
    on_bg "$src" python3 "$py" udp-client "$(host_ip4 "$dst")" 7100 "$cap" >"$WORK/flow-udp-client.txt" 2>&1
    FLOW_UDP_CLI=$BG_PID
    on_bg "$src" python3 "$py" tcp-client "$(host_ip4 "$dst")" 7101 "$cap" >"$WORK/flow-tcp-client.txt" 2>&1
    FLOW_TCP_CLI=$BG_PID
    wait_until 10 tcp_established "$src" 7101
    FLOW_T0=$SECONDS FLOW_SRC=$src FLOW_DST=$dst
    log "flows host $src -> host $dst running: UDP port 7100, TCP port 7101"
}

# flow_check: stops what flow_start started (SIGTERM: each client prints its
# summary), logs the figures and fails unless not one UDP datagram was lost
# (neither a gap nor at the tail) with at least 25 of the nominal 100 a second
# received, and the TCP connection neither broke nor stalled for more than
# 1 s with at least 10 of the nominal 50 echoes a second. The floors catch a
# flow that silently stopped; they leave room for a slow emulated VM.
flow_check() {
    local secs=$((SECONDS - FLOW_T0)) udp_alive=1 tcp_alive=1 tcp_rc=0 udp tcp
    local sent max_seq received lost echoes stall
    kill -0 "$FLOW_UDP_CLI" 2>/dev/null || udp_alive=0
    kill -0 "$FLOW_TCP_CLI" 2>/dev/null || tcp_alive=0
    bg_stop "$FLOW_UDP_CLI" TERM || true
    bg_stop "$FLOW_TCP_CLI" TERM || tcp_rc=$?
    nap 1 # the last datagrams in flight
    bg_stop "$FLOW_UDP_SRV" TERM || true
    # Ends by itself once the client has closed the connection.
    bg_stop "$FLOW_TCP_SRV" TERM || true
    udp="$(<"$WORK/flow-udp-client.txt") $(<"$WORK/flow-udp-server.txt")"
    tcp=$(<"$WORK/flow-tcp-client.txt")
    log "UDP over $secs s: $udp"
    log "TCP over $secs s: $tcp (exit status $tcp_rc)"
    sent=$(sed -n 's/^sent=\([0-9]*\).*/\1/p' "$WORK/flow-udp-client.txt")
    max_seq=$(sed -n 's/.*max_seq=\([0-9]*\).*/\1/p' "$WORK/flow-udp-server.txt")
    received=$(sed -n 's/.*received=\([0-9]*\).*/\1/p' "$WORK/flow-udp-server.txt")
    lost=$(sed -n 's/.*lost=\([0-9-]*\).*/\1/p' "$WORK/flow-udp-server.txt")
    echoes=$(sed -n 's/.* received=\([0-9]*\).*/\1/p' "$WORK/flow-tcp-client.txt")
    stall=$(sed -n 's/.*max_stall_ms=\([0-9]*\).*/\1/p' "$WORK/flow-tcp-client.txt")
    if [[ ${lost:-?} != 0 || ${max_seq:-?} != "${sent:-??}" ]]; then
        # Where the datagrams went: the kernel's drop counters at both ends.
        for i in "$FLOW_SRC" "$FLOW_DST"; do
            log "host $i XFRM drops: $(on "$i" awk '$2 != 0 {printf "%s=%s ", $1, $2}' /proc/net/xfrm_stat)"
            log "host $i UDP: $(on "$i" awk '/^Udp:/ {if (!h) {h = $0; next}; split(h, k); for (f = 2; f <= NF; f++) if ($f != 0) printf "%s=%s ", k[f], $f}' /proc/net/snmp)"
        done
    fi
    [[ $tcp == *error=none* ]] || fail "the TCP connection broke: $tcp"
    assert_cmp "${stall:-99999}" -le 1000 "longest TCP stall (ms)"
    ((tcp_alive)) || fail "the TCP client ended before flow_check: $tcp"
    ((udp_alive)) || fail "the UDP client ended before flow_check: $udp"
    assert_eq "${lost:-?}" 0 "UDP datagrams lost (gaps)"
    assert_eq "${max_seq:-?}" "${sent:-??}" "last UDP datagram received vs sent (tail loss)"
    assert_cmp "${received:-0}" -ge $((25 * secs)) "UDP datagrams received in $secs s"
    assert_cmp "${echoes:-0}" -ge $((10 * secs)) "TCP echoes received in $secs s"
}

# listings_start N: samples the membership listing of hosts 1..N in a loop
# until listings_stop, one line per sample in $WORK/listing.txt: "COUNT hI
# name:state,...". A host whose agent has been up less than 10 s is skipped (a
# fresh agent knows only itself until gossip reaches it).
listings_start() {
    local n=$1
    (
        while :; do
            for i in $(seq 1 "$n"); do
                line=$(bedq "$i" states 10 2>/dev/null) || continue
                echo "${line%% *} h$i ${line#* }" >>"$WORK/listing.txt"
            done
        done
    ) &
    LISTINGS_PID=$!
    ledger_add "$BED_LEDGER" pid "$LISTINGS_PID"
}

# listings_stop N [STATES]: ends listings_start and fails unless there were
# more than 10 samples, each listing all N members, none of them in a state
# matched by the grep pattern STATES (default 'left').
listings_stop() {
    local n=$1 states=${2:-left}
    kill "$LISTINGS_PID" 2>/dev/null || true
    wait "$LISTINGS_PID" 2>/dev/null || true
    log "listing samples: $(wc -l <"$WORK/listing.txt")"
    assert_cmp "$(wc -l <"$WORK/listing.txt")" -gt 10 "listing samples"
    if [[ -n $(awk -v n="$n" '$1 != n' "$WORK/listing.txt") ]]; then
        fail "a member was missing from a listing: $(awk -v n="$n" '$1 != n' "$WORK/listing.txt" | head -n3)"
    fi
    if grep -qE ":($states)(,|$)" "$WORK/listing.txt"; then
        fail "a member was listed as $states: $(grep -m3 -E ":($states)(,|$)" "$WORK/listing.txt")"
    fi
}

# --- ESP by hand ---------------------------------------------------------------

bed_hexkey() { od -An -tx1 -N "$1" /dev/urandom | tr -d ' \n'; }

# xfrm_pair I J [4|6|46]: hand-installs transport-mode ESP between hosts I and
# J with rfc4106(gcm(aes)) (20-byte key = AES-128 + 4-byte salt, 128-bit ICV):
# one SA per direction with its own key, and out/in policies that require ESP.
xfrm_pair() {
    local i=$1 j=$2 fams=${3:-46} fam a b plen k1 k2 spi1 spi2 ci= cj=
    for fam in 4 6; do
        [[ $fams == *$fam* ]] || continue
        if [[ $fam == 4 ]]; then a=$(host_ip4 "$i") b=$(host_ip4 "$j") plen=32
        else a=$(host_ip6 "$i") b=$(host_ip6 "$j") plen=128
        fi
        k1=0x$(bed_hexkey 20) k2=0x$(bed_hexkey 20)
        spi1=$(printf '0x%x' $((0x1000 + i * 256 + j * 16 + fam)))
        spi2=$(printf '0x%x' $((0x1000 + j * 256 + i * 16 + fam)))
        ci+=$(xfrm_sa_cmd "$a" "$b" "$spi1" "$k1")$'\n'$(xfrm_sa_cmd "$b" "$a" "$spi2" "$k2")$'\n'
        cj+=$(xfrm_sa_cmd "$a" "$b" "$spi1" "$k1")$'\n'$(xfrm_sa_cmd "$b" "$a" "$spi2" "$k2")$'\n'
        ci+=$(xfrm_policy_cmds "$a" "$b" "$plen")$'\n'
        cj+=$(xfrm_policy_cmds "$b" "$a" "$plen")$'\n'
    done
    ip -n "$(bed_ns "$i")" -batch - <<<"$ci"
    ip -n "$(bed_ns "$j")" -batch - <<<"$cj"
    log "xfrm: ESP transport between hosts $i and $j (IPv$fams)"
}
# xfrm_sa_cmd SRC DST SPI KEY: the "ip xfrm" line for one SA; XFRM_SA_EXTRA
# (e.g. "flag esn replay-window 4096") is appended when set.
xfrm_sa_cmd() {
    echo "xfrm state add src $1 dst $2 proto esp spi $3 reqid 1 mode transport aead rfc4106(gcm(aes)) $4 128${XFRM_SA_EXTRA:+ $XFRM_SA_EXTRA}"
}
# xfrm_policy_cmds LOCAL REMOTE PREFIXLEN: out and in policies requiring ESP.
xfrm_policy_cmds() {
    echo "xfrm policy add src $1/$3 dst $2/$3 dir out tmpl src $1 dst $2 proto esp reqid 1 mode transport"
    echo "xfrm policy add src $2/$3 dst $1/$3 dir in tmpl src $2 dst $1 proto esp reqid 1 mode transport"
}
# xfrm_policy_pair HOST LOCAL REMOTE PREFIXLEN: just the policies, on one host.
xfrm_policy_pair() {
    ip -n "$(bed_ns "$1")" -batch - <<<"$(xfrm_policy_cmds "$2" "$3" "$4")"
}

# --- kernel ESP state ----------------------------------------------------------
# The one parser of `ip xfrm state` listings; filters run as bash builtins
# (every exec is slow in the emulated VM).

# xfrm_sas I: host I's ESP SAs, one "SRC DST SPI" line each, in the kernel's order.
xfrm_sas() {
    on "$1" ip xfrm state | awk '/^src/ {p = $2 " " $4} /proto esp spi/ {print p, $4}'
}
# xfrm_spis I SRC DST: the SPIs of host I's ESP SAs whose source and
# destination match the bash patterns SRC and DST ('*' = any).
xfrm_spis() {
    local src dst spi
    xfrm_sas "$1" | while read -r src dst spi; do
        # shellcheck disable=SC2053 # patterns on purpose
        if [[ $src == $2 && $dst == $3 ]]; then echo "$spi"; fi
    done
}
# xfrm_dirs I [ADDR]: "OUT IN", how many of host I's ESP SAs go from / to
# ADDR (default host I's IPv4 address).
xfrm_dirs() {
    local addr=${2:-$(host_ip4 "$1")}
    xfrm_sas "$1" | {
        local src dst _ out=0 in=0
        while read -r src dst _; do
            if [[ $src == "$addr" ]]; then out=$((out + 1)); fi
            if [[ $dst == "$addr" ]]; then in=$((in + 1)); fi
        done
        echo "$out $in"
    }
}
# xfrm_sa_count I: how many SAs host I's kernel holds (`ip xfrm state count`).
xfrm_sa_count() { on "$1" ip xfrm state count | awk '{print $NF}'; }

# --- cleanup ------------------------------------------------------------------

bed_cleanup() {
    local rc=$? i name pid
    trap - ERR
    [[ $BASHPID == "$BED_MAIN_PID" ]] || return "$rc"
    [[ $BED_CLEANED == 1 ]] && return
    BED_CLEANED=1
    set +e
    for name in "${!CAPTURE_PID[@]}"; do
        pid=${CAPTURE_PID[$name]}
        kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    for i in "${!AGENT_PID[@]}"; do
        pid=${AGENT_PID[$i]}
        [[ -n $pid ]] || continue
        kill -TERM "$pid" 2>/dev/null
    done
    # Give agents a moment to shut down cleanly (their logs say more), then
    # the ledger sweep kills whatever is left, including strays in namespaces.
    for ((i = 0; i < 30; i++)); do
        local alive=0
        for pid in "${AGENT_PID[@]}"; do
            [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        nap 0.1
    done
    ledger_sweep "$BED_LEDGER"
    # Background jobs the scenario started in the caller's namespace.
    for pid in $(jobs -p); do
        kill -KILL "$pid" 2>/dev/null
    done
    exit "$rc"
}
