#!/usr/bin/env bash
# needs: esp
# timeout: 300
# The datapath's kernel tests on a real ESP kernel: SAs for all three AEADs,
# the probe passing and leaving nothing behind, two namespaces pinging through
# SAs and policies installed by meshsec's netlink code (ESP on the wire), fail
# closed + socket bypass, ownership, ALLOCSPI, replay/integrity counters, and
# the kernel's soft/hard expiry notifications reaching the XFRM event monitor,
# and the kernel loading esp4_offload/esp6_offload for the probe's offload SA.
# Each test unshares its own network namespace. MESHSEC_UNIT_TEST_BIN is the
# library's unit-test executable (testnet/run finds it with cargo).
. "$(dirname "$0")/../lib/bed.sh"

[[ -n ${MESHSEC_UNIT_TEST_BIN:-} && -x $MESHSEC_UNIT_TEST_BIN ]] ||
    fail "MESHSEC_UNIT_TEST_BIN is not set to the unit-test executable (run through testnet/run)"
tests=(
    datapath::xfrm::tests::esp_sas_aes128
    datapath::xfrm::tests::esp_sas_aes256_chacha
    datapath::xfrm::tests::esp_probe_passes_and_leaves_nothing
    datapath::xfrm::tests::esp_two_namespaces_ping
    datapath::xfrm::tests::esp_replay_and_integrity_counters
    datapath::xfrm::tests::esp_expire_notifications
    datapath::xfrm::tests::esp_offload_autoload
    datapath::xfrm::tests::kernel_policies
    datapath::xfrm::tests::kernel_policy_deletion_events
    datapath::xfrm::tests::kernel_ownership
    datapath::xfrm::tests::kernel_alloc_spi
    datapath::xfrm::tests::kernel_fail_closed_and_bypass
)
"$MESHSEC_UNIT_TEST_BIN" --ignored --exact --test-threads=1 "${tests[@]}" 2>&1 | tee "$WORK/tests.txt"
grep -q "test result: ok. ${#tests[@]} passed" "$WORK/tests.txt" || fail "not all ${#tests[@]} kernel tests passed"
log "datapath kernel tests ok"
