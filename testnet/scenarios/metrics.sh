#!/usr/bin/env bash
# needs: esp
# timeout: 300
# Issue 13 acceptance for the Prometheus endpoint: a real Prometheus server
# (Debian's, in a fifth namespace on the bridge) scrapes the agents of a
# 4-host ESP mesh (IPv4 and IPv6) with docs/alerts.yml loaded; its HTTP API
# reports 4 alive members and 6 established links (3 peers x 2 families) on
# every host; ESP packets with a bad ICV sent to host 2 on its SA from host 1
# raise exactly that link's integrity-failure counter (and the kernel's
# XfrmInStateProtoError) and fire MeshsecIntegrityFailures, nothing else.
# promtool checks a real scrape and the rules file.
. "$(dirname "$0")/../lib/bed.sh"

N=4
PROM=$((N + 1))
MPORT=9342
INJECTED=5
command -v prometheus >/dev/null && command -v promtool >/dev/null \
    || fail "prometheus and promtool are missing (testnet/setup installs the Debian package)"
bed_up $PROM
"$MESHSEC_BIN" init --out "$WORK/secret" 2>/dev/null

# A bad value is refused in one line naming the flag, before anything starts.
if on 1 "$MESHSEC_BIN" agent --state-dir "$WORK/h1/bad" --control-socket "$BED_SOCK_DIR/bad.sock" \
    --secret-file "$WORK/secret" --listen "$(host_ip4 1):9340" --metrics-listen "$(host_ip4 1)" \
    >"$WORK/bad-flag.txt" 2>&1; then
    fail "an agent started with --metrics-listen without a port"
fi
assert_eq "$(grep -c . "$WORK/bad-flag.txt")" 1 "lines of the --metrics-listen error"
assert grep -q -- '--metrics-listen' "$WORK/bad-flag.txt"

for i in $(seq 1 $N); do
    seed=()
    ((i != 1)) && seed=(--seed "$(host_ip4 1):9340")
    agent_start "$i" --listen "$(host_ip4 "$i"):9340" --secret-file "$WORK/secret" --node-name "h$i" \
        --data-address "$(host_ip4 "$i")" --data-address "$(host_ip6 "$i")" \
        --metrics-listen "$(host_ip4 "$i"):$MPORT" "${seed[@]}"
done

# Prometheus: scrape every agent, evaluate the shipped rules, every second or two.
PDIR=$BED_SOCK_DIR/prom # tmpfs in the VM: the TSDB wants a local file system
mkdir -p "$PDIR/data"
{
    echo "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 1s}"
    echo "rule_files: ['$BED_REPO/docs/alerts.yml']"
    echo "scrape_configs:"
    echo "  - job_name: meshsec"
    echo "    static_configs:"
    echo "      - targets:"
    for i in $(seq 1 $N); do echo "          - '$(host_ip4 "$i"):$MPORT'"; done
} >"$WORK/prometheus.yml"
promtool check config "$WORK/prometheus.yml" >"$WORK/promtool-config.txt" 2>&1 \
    || fail "promtool check config: $(<"$WORK/promtool-config.txt")"
promtool check rules "$BED_REPO/docs/alerts.yml" >"$WORK/promtool-rules.txt" 2>&1 \
    || fail "promtool check rules: $(<"$WORK/promtool-rules.txt")"
log "promtool check rules docs/alerts.yml: $(grep -o 'SUCCESS.*' "$WORK/promtool-rules.txt")"
PURL="http://$(host_ip4 $PROM):9090"
on_bg $PROM prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$PDIR/data" \
    --web.listen-address="$(host_ip4 $PROM):9090" --log.level=warn >"$WORK/prometheus.log" 2>&1
PROM_PID=$BG_PID

# promq EXPR [WANT [TIMEOUT]]: evaluates EXPR through Prometheus's HTTP API
# (/api/v1/query) and prints one line per series, "{label=value,...} value",
# sorted; with WANT, polls until that output equals WANT (or times out, then
# prints what it last saw and fails). EXPR "ALERTS!" lists /api/v1/alerts
# instead. One python process per call: every exec is slow in the VM.
cat >"$WORK/promq.py" <<'EOF'
import json, sys, time, urllib.parse, urllib.request
base, expr = sys.argv[1], sys.argv[2]
want = sys.argv[3] if len(sys.argv) > 3 else None
deadline = time.time() + (float(sys.argv[4]) if len(sys.argv) > 4 else 0)
def fmt(labels, value):
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
    return "{" + inner + "} " + value
def ask():
    if expr == "ALERTS!":
        with urllib.request.urlopen(base + "/api/v1/alerts", timeout=5) as r:
            alerts = json.load(r)["data"]["alerts"]
        return "\n".join(sorted(fmt(a["labels"], a["state"]) for a in alerts))
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        res = json.load(r)["data"]["result"]
    return "\n".join(sorted(fmt(s["metric"], s["value"][1]) for s in res))
while True:
    try:
        out = ask()
    except Exception as e:
        out = f"error: {e}"
    if want is None or out == want or time.time() >= deadline:
        break
    time.sleep(0.5)
print(out)
sys.exit(0 if want is None or out == want else 1)
EOF
promq() { on $PROM python3 "$WORK/promq.py" "$PURL" "$@"; }

# Every agent up and scraped, 4 alive members and 6 established links each.
t0=$SECONDS
promq 'count(up{job="meshsec"} == 1)' '{} 4' 120 >"$WORK/q-up.txt" \
    || fail "Prometheus does not scrape 4 agents: $(<"$WORK/q-up.txt") ($(tail -n3 "$WORK/prometheus.log"))"
promq 'count(meshsec_members{state="alive"} == 4) + count(sum by (instance) (meshsec_links{state="established"}) == 6)' \
    '{} 8' 120 >"$WORK/q-ready.txt" || fail "mesh not complete in Prometheus: $(<"$WORK/q-ready.txt")"
log "Prometheus sees the complete mesh after $((SECONDS - t0)) s"
promq 'meshsec_members{state="alive"}' >"$WORK/q-members.txt"
promq 'sum by (instance, family) (meshsec_links{state="established"})' >"$WORK/q-links.txt"
promq 'count by (instance) (meshsec_link_up == 1)' >"$WORK/q-link-up.txt"
log "alive members per host: $(awk '{print $NF}' "$WORK/q-members.txt" | paste -sd' ')"
log "established links per host and family: $(awk '{print $NF}' "$WORK/q-links.txt" | paste -sd' ')"
assert_eq "$(awk '$NF == 4' "$WORK/q-members.txt" | wc -l)" $N "hosts listing 4 alive members"
assert_eq "$(awk '$NF == 3' "$WORK/q-links.txt" | wc -l)" $((N * 2)) "(host, family) pairs with 3 established links"
assert_eq "$(awk '$NF == 6' "$WORK/q-link-up.txt" | wc -l)" $N "hosts with 6 links up"
assert_eq "$(promq 'sum(meshsec_link_integrity_failures_total)')" '{} 0' "integrity failures before the injection"
assert_eq "$(promq 'count(meshsec_build_info == 1)')" '{} 4' "agents exposing meshsec_build_info"
refute grep -q MeshsecIntegrityFailures <<<"$(promq 'ALERTS!')"

# promtool on a real scrape (fetched from the Prometheus namespace, as Prometheus does).
on $PROM python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://$(host_ip4 2):$MPORT/metrics" >"$WORK/scrape-h2.txt"
promtool check metrics <"$WORK/scrape-h2.txt" >"$WORK/promtool-metrics.txt" 2>&1 \
    || fail "promtool check metrics on host 2's scrape: $(<"$WORK/promtool-metrics.txt")"
assert grep -q '^meshsec_kernel_xfrm_errors_total{counter="XfrmInStateProtoError"} 0$' "$WORK/scrape-h2.txt"
log "promtool check metrics: a real scrape of $(grep -c '^meshsec_' "$WORK/scrape-h2.txt") samples is clean"

# Bad-ICV ESP to host 2 on its inbound SA from host 1 (IPv4), sent from the
# Prometheus namespace with a raw socket: the kernel finds the SA by
# destination and SPI, the sequence numbers are fresh (past the replay check),
# and the ICV is random, so each packet fails the integrity check.
mapfile -t spis < <(xfrm_spis 2 "$(host_ip4 1)" "$(host_ip4 2)")
# One SA in steady state (a re-key would briefly add a second).
assert_eq "${#spis[@]}" 1 "host 2's SAs from host 1 (${spis[*]})"
on $PROM python3 - "$(host_ip4 2)" "${spis[0]}" "$INJECTED" <<'EOF'
import os, socket, struct, sys
dst, spi, count = sys.argv[1], int(sys.argv[2], 16), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)   # IPPROTO_ESP
for k in range(count):
    # SPI, sequence number, 8-byte IV, 64 bytes of "ciphertext", 16-byte ICV.
    s.sendto(struct.pack("!II", spi, 0x40000000 + k) + os.urandom(8 + 64 + 16), (dst, 0))
EOF
log "injected $INJECTED bad-ICV ESP packets to host 2 on SPI ${spis[0]}"

h2="$(host_ip4 2):$MPORT"
promq "meshsec_link_integrity_failures_total{instance=\"$h2\",peer=\"h1\",family=\"ipv4\"}" \
    "{family=ipv4,instance=$h2,job=meshsec,peer=h1} $INJECTED" 30 >"$WORK/q-icv.txt" \
    || fail "host 2's integrity failures from h1: $(<"$WORK/q-icv.txt")"
log "Prometheus: $(<"$WORK/q-icv.txt")"
assert_eq "$(promq 'sum(meshsec_link_integrity_failures_total)')" "{} $INJECTED" "integrity failures on all links"
assert_eq "$(promq "meshsec_kernel_xfrm_errors_total{instance=\"$h2\",counter=\"XfrmInStateProtoError\"}")" \
    "{counter=XfrmInStateProtoError,instance=$h2,job=meshsec} $INJECTED" "host 2's XfrmInStateProtoError"
promq 'ALERTS!' "{alertname=MeshsecIntegrityFailures,family=ipv4,instance=$h2,job=meshsec,peer=h1,severity=warning} firing" 30 \
    >"$WORK/q-alerts.txt" || fail "MeshsecIntegrityFailures did not fire (alone): $(<"$WORK/q-alerts.txt")"
log "alert: $(<"$WORK/q-alerts.txt")"
# The links carry on: host 1 still reaches host 2 over ESP.
assert on 1 ping -c1 -W3 -q "$(host_ip4 2)"
bg_stop "$PROM_PID" TERM || true
log "metrics ok: 4 agents scraped, 4 alive members and 6 links each, $INJECTED integrity failures seen and alerted"
