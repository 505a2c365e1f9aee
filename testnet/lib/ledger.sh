# shellcheck shell=bash
# The bed writes every namespace, link, process and folder it creates into a
# ledger file, one "KIND VALUE [START]" line each, before anything else can go
# wrong. Cleanup (the bed's own EXIT trap, or the runner when a scenario had to
# be SIGKILLed) removes exactly what the ledger names, so nothing outside the
# bed is ever touched and nothing inside it survives.

# ledger_add FILE KIND VALUE (KIND sysctl: VALUE is the setting's name, and
# its current value is kept to be put back)
ledger_add() {
    local file=$1 kind=$2 value=$3 start=
    if [[ $kind == pid ]]; then
        # The start time (field 22 of /proc/PID/stat) guards against killing a
        # recycled PID long after the original process ended.
        start=$(proc_start "$value")
    elif [[ $kind == sysctl ]]; then
        start=$(sysctl -n "$value")
    fi
    printf '%s %s %s\n' "$kind" "$value" "$start" >>"$file"
}

proc_start() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # comm (field 2) may contain spaces; cut after its closing parenthesis.
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo "${20}"
}

# ledger_sweep FILE: removes everything the ledger names. Safe to run twice.
ledger_sweep() {
    local file=$1 kind value start p
    [[ -r $file ]] || return 0
    # Processes first (newest first), so nothing recreates state behind us.
    while read -r kind value start; do
        [[ $kind == pid ]] || continue
        [[ -n $start && $(proc_start "$value") == "$start" ]] || continue
        kill -KILL "$value" 2>/dev/null || true
    done < <(tac "$file")
    # Files worth keeping are copied next to the ledger before folders go.
    while read -r kind value start; do
        [[ $kind == save && -e $value ]] && cp -f -- "$value" "$(dirname "$file")/" 2>/dev/null  || true
    done <"$file"
    while read -r kind value start; do
        case $kind in
            netns)
                if [[ -e /run/netns/$value ]]; then
                    for p in $(ip netns pids "$value" 2>/dev/null); do
                        kill -KILL "$p" 2>/dev/null || true
                    done
                    ip netns del "$value" 2>/dev/null || true
                fi
                ;;
            link)
                # Usually gone already with its namespace; checking is cheaper than exec'ing ip.
                [[ -e /sys/class/net/$value ]] && ip link del "$value" 2>/dev/null || true
                ;;
            dir)
                rm -rf -- "$value"
                ;;
            sysctl)
                # A shared kernel setting raised for the run: its old value back.
                [[ -n $start ]] && sysctl -qw "$value=$start" 2>/dev/null || true
                ;;
        esac
    done < <(tac "$file")
}
