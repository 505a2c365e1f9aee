#!/usr/bin/env bash
# needs: esp
# timeout: 600
# The mesh-esp scenario with the cluster-wide algorithm switched to
# chacha20-poly1305 (rfc7539esp).
ESP_ALG=chacha20-poly1305 exec bash "$(dirname "$0")/mesh-esp.sh"
