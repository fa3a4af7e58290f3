# Shell functions scripts/slurm.sh and scripts/slurm-two-nodes.sh share; sourced, not run. The sourcing script sets
# NAME (its name in messages), STATE (its state folder), PACKAGES (Debian packages) and EXES (the programs they bring).

log() { echo "$NAME: $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or time runs out
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what (logs in $STATE)"
        sleep 0.2
    done
}

install_packages() {  # PACKAGES from apt-get, unless every one of EXES is there already
    local missing=0 exe
    for exe in "${EXES[@]}"; do
        command -v "$exe" >/dev/null || PATH=$PATH:/usr/sbin command -v "$exe" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

stop() {  # stop PIDFILE...: SIGTERM them together, wait up to 20 s, then SIGKILL what is left
    local file pid pids=()
    for file in "$@"; do
        if alive "$file"; then pids+=("$(cat "$file")"); kill "${pids[-1]}"; fi
    done
    for _ in $(seq 100); do
        local left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        ((left)) || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored SIGTERM: killing it"; kill -9 "$pid"; fi
    done
    rm -f "$@"
}
