# What every demo does first; sourced by examples/*/run.sh. Sets $vrun.
# The job must not inherit stray fds from whatever started the demo (a checkpoint would rightly refuse them).
for fd in /proc/$$/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true; done
# Debian packages the demo needs, installed when missing: need COMMAND:PACKAGE...
need() {
    local missing=()
    for cp in "$@"; do command -v "${cp%%:*}" >/dev/null || missing+=("${cp##*:}"); done
    [ ${#missing[@]} -eq 0 ] || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}
# $VOS_BIN: where vrun is already built (the test suite sets it); otherwise build it.
vos_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${VOS_BIN:-}" ] || (cd "$vos_root" && cargo build --release --quiet)
vrun="${VOS_BIN:-$vos_root/target/release}/vrun"
# wait_until PID CMD...: wait until CMD succeeds, failing if the job started as PID ends first.
wait_until() {
    local pid=$1; shift
    until "$@"; do
        kill -0 "$pid" 2>/dev/null || { echo "the job ended before it got there"; return 1; }
        sleep 0.05
    done
}
# checkpoint_kill NAME PID: checkpoint job NAME (started as PID) and end it; sets $img to the image's path. Its
# vrun must exit 75 (checkpointed and stopped).
checkpoint_kill() {
    local rc=0
    img="$("$vrun" checkpoint "$1" --kill --quiet)"
    wait "$2" || rc=$?
    [ $rc = 75 ] || { echo "vrun exited $rc, not 75 (checkpointed and stopped)"; return 1; }
}
