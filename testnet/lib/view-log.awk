# Reads an agent's log (its "membership changed" lines) and prints, for
# bench-gossip: the time of day in seconds at which it first listed n members
# alive ("-" if never), how many members it lists alive at the end of the
# log, and how many times a member went from alive to another state after
# that first moment (flaps).
#   awk -v n=N -f view-log.awk agent.log
function secs(ts,   t) { t = substr(ts, 12, 15); return substr(t, 1, 2) * 3600 + substr(t, 4, 2) * 60 + substr(t, 7) }
/membership changed/ {
    peer = ""; from = ""; to = ""
    for (i = 1; i <= NF; i++) {
        if ($i ~ /^peer=/) peer = substr($i, 6)
        if ($i ~ /^from=/) from = substr($i, 6)
        if ($i ~ /^to=/) to = substr($i, 4)
    }
    if (state[peer] == "alive") alive--
    state[peer] = to
    if (to == "alive") alive++
    if (first != "" && from == "alive") flaps++
    if (first == "" && alive == n) first = secs($1)
}
END { print (first == "" ? "-" : first), alive + 0, flaps + 0 }
