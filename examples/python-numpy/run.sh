#!/usr/bin/env bash
# Demo: python3 with numpy from PyPI (in a venv, cached in ~/.cache/vos-demo-venv) in the middle of a long
# computation holding numpy arrays, a seeded numpy generator and pure-Python state (a list, a dict, a big integer)
# is checkpointed, killed and restored; it goes on from the step where it stopped, and its final hashes equal
# those of the same computation run natively, uninterrupted.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../common.sh"
need /usr/bin/python3:python3
venv="${VOS_DEMO_VENV:-$HOME/.cache/vos-demo-venv}"
if ! "$venv/bin/python3" -c 'import numpy' 2>/dev/null; then
    /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; }
    echo "== making a venv with numpy from PyPI in $venv (once)"
    /usr/bin/python3 -m venv --clear "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check numpy
fi
py="$venv/bin/python3"
export OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2     # two BLAS worker threads, fixed: the same float sums in every run
steps=150
work="$(mktemp -d /tmp/vos-numpy.XXXXXX)"
out="$work/out.txt"
job="numpy-$$"

echo "== python3 + numpy $("$py" -c 'import numpy; print(numpy.__version__)') under vrun (job $job, $steps steps)"
"$vrun" --quiet --name "$job" --dir "$work" "$py" "$here/sim.py" $steps > "$out" 2>&1 &
pid=$!
wait_until $pid grep -q "^step 50/" "$out" || { cat "$out"; exit 1; }
echo "== checkpoint and kill it midway"
checkpoint_kill "$job" $pid || { cat "$out"; exit 1; }
echo "   image: $img ($(du -h "$img" | cut -f1)); last line before: $(grep '^step' "$out" | tail -1)"
"$vrun" inspect "$img" | grep -E '^(tree|  [0-9]+ python3)' | sed 's/^/   /'
echo "== the same computation natively, uninterrupted (for the reference result)"
"$py" "$here/sim.py" $steps > "$work/native.txt"
echo "== restore it (it goes on in the foreground until done)"
"$vrun" restore --quiet "$img" > /dev/null
echo "== check: every step once, in order, and the final state equals the native run's"
"$py" - "$out" "$work/native.txt" $steps <<'PY'
import sys
got, ref, steps = open(sys.argv[1]).read().splitlines(), open(sys.argv[2]).read().splitlines(), int(sys.argv[3])
nums = [int(l.split()[1].split("/")[0]) for l in got if l.startswith("step ")]
assert nums == list(range(1, steps + 1)), f"steps not 1..{steps} exactly once: {nums[:5]}...{nums[-5:]}"
diff = [f"   restored: {a}\n   native:   {b}" for a, b in zip(got, ref) if a != b]
assert got == ref, "the output differs from the native run's:\n" + "\n".join(diff[:4] or [f"{len(got)} vs {len(ref)} lines"])
for line in got[-2:]:
    print("  ", line)
PY
rm -rf "$work"
echo "== ok: the restored numpy computation finished with the same arrays, generator and Python state as a native run"
