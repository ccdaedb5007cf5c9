#!/usr/bin/env bash
# Quick start: run python3 under vOS, checkpoint it, kill it, restore it; the computation goes on where it was.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../common.sh"
work="$(mktemp -d /tmp/vos-quickstart.XXXXXX)"
out="$work/out.txt"

echo "== starting python3 under vrun (job 'calc', images in $work)"
"$vrun" --quiet --name calc --dir "$work" python3 "$here/count.py" 120 > "$out" 2>&1 &
until grep -q "i=20 " "$out" 2>/dev/null; do sleep 0.1; done
echo "== checkpoint and stop it"
img="$("$vrun" checkpoint calc --kill)"
wait || true
last="$(tail -1 "$out")"
echo "   image: $img ($(du -h "$img" | cut -f1)); last line before: $last"
"$vrun" inspect "$img" | sed -n '1,/^size/p' | sed 's/^/   /'
echo "== restore it (it goes on in the foreground until done)"
"$vrun" restore --quiet "$img" > /dev/null
echo "== check: every i from 0 to 119 exactly once, totals right"
python3 - "$out" <<'PY'
import sys
total, i = 0, 0
for line in open(sys.argv[1]):
    k, t = (int(f.split("=")[1]) for f in line.split())
    assert k == i, f"expected i={i}, found i={k}"
    total += k * k
    assert t == total, f"wrong total at i={k}"
    i += 1
assert i == 120, f"only {i} lines"
print(f"   OK: 120 steps, no gap, no repeat, final total {total}")
PY
rm -rf "$work"
echo "== ok"
