# shellcheck shell=bash
# bench-datapath plug-in: ESP SAs and policies installed by two meshsec agents
# (kernel datapath, aes128-gcm), to compare with hand-installed ESP in the same
# VM run. Goal: ratio ≥ 0.98, the agent adds nothing to the data path. The
# agents load esp4_offload themselves (autoload through their probe SA).
BENCH_DATAPATHS+=(meshsec)

dp_meshsec_up() {
    # Once per bench run: with --repeat this runs every round, and init
    # refuses to overwrite an existing secret.
    [[ -e $WORK/bench-secret ]] || "$MESHSEC_BIN" init --out "$WORK/bench-secret" 2>/dev/null
    # As on a stock host: the ESP GSO modules out, for the agent to load.
    if declare -F offload_unload >/dev/null; then offload_unload; fi
    agent_start 1 --listen "$(host_ip4 1):9340" --secret-file "$WORK/bench-secret" --node-name b1 \
        --data-address "$(host_ip4 1)" >/dev/null
    agent_start 2 --listen "$(host_ip4 2):9340" --secret-file "$WORK/bench-secret" --node-name b2 \
        --data-address "$(host_ip4 2)" --seed "$(host_ip4 1):9340" >/dev/null
    dp_meshsec_ready() { [[ $(xfrm_sa_count 1) == 2 && $(xfrm_sa_count 2) == 2 ]]; }
    wait_until 120 dp_meshsec_ready
    # The agents load the ESP GSO modules themselves; note what they found,
    # once per run (one has the kernel load them, "autoloaded"; the other may
    # find them "loaded" already).
    local i st
    for i in 1 2; do
        st=$(agent_ctl "$i" status --json)
        [[ $st =~ \"esp_offload\":(\{[^}]*\}) ]] && st=${BASH_REMATCH[1]}
        log "meshsec agent $i: ESP GSO offload $st"
        [[ -e $WORK/notes-meshsec-$i ]] && continue
        touch "$WORK/notes-meshsec-$i"
        echo "- meshsec agent b$i, first round: \`meshsec status --json\` esp_offload $st" >>"$WORK/notes"
    done
    DP_TARGET=$(host_ip4 2)
}

dp_meshsec_down() {
    # A stop leaves the SAs in the kernel (by design); flush removes them.
    agent_stop 1 >/dev/null
    agent_stop 2 >/dev/null
    on 1 "$MESHSEC_BIN" flush --control-socket "$(agent_socket 1)" >/dev/null
    on 2 "$MESHSEC_BIN" flush --control-socket "$(agent_socket 2)" >/dev/null
}
