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
