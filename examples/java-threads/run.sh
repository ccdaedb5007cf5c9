#!/usr/bin/env bash
# Demo: a JVM running a multithreaded Java program (a pool of 4 worker threads merging into ConcurrentHashMaps
# shared by all of them) is checkpointed and killed half-way, then restored; it finishes with exactly the result
# of an uninterrupted run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../common.sh"
need java:default-jre-headless
work="$(mktemp -d /tmp/vos-java.XXXXXX)"
name="java-threads-$$"
tasks=300 per=50000 workers=4                   # the numbers 0..15M-1 in 300 tasks, ~10 s of CPU
prog=(java "$here/Tally.java" $tasks $per $workers)  # a single-file program: the JVM compiles it at start
n=$((tasks * per))

echo "== reference: the same program run directly, uninterrupted"
expected="$(cd "$work" && "${prog[@]}" | grep '^result')"
echo "   $expected"
echo "== the same program under vrun (job '$name', images in $work)"
(cd "$work" && exec "$vrun" --quiet --name "$name" --dir "$work" "${prog[@]}") > "$work/out.txt" 2>&1 &
job=$!
wait_until $job grep -q "^progress $((tasks * 3 / 10))/" "$work/out.txt" || { cat "$work/out.txt"; exit 1; }
echo "== checkpoint and kill it mid-way"
checkpoint_kill "$name" $job || { cat "$work/out.txt"; exit 1; }
! grep -q '^result' "$work/out.txt" || { echo "the program was done before the checkpoint"; exit 1; }
echo "   image: $img ($(du -h "$img" | cut -f1)); last line before: $(tail -1 "$work/out.txt")"
"$vrun" inspect "$img" | grep -E '^(threads|memory)|pool-1-thread' | sed 's/^ */   /'
echo "== restore it (it goes on in the foreground until done)"
"$vrun" restore --quiet "$img" > /dev/null
got="$(grep '^result' "$work/out.txt")" || { echo "no result after the restore:"; tail -5 "$work/out.txt"; exit 1; }
echo "   $got"
echo "== check: the same result as the uninterrupted run, every task counted once, the totals right"
[ "$got" = "$expected" ] || { echo "the restored run's result differs from the uninterrupted run's"; exit 1; }
seq $((tasks / 20)) $((tasks / 20)) $tasks | sed "s|.*|progress &/$tasks tasks|" > "$work/want.txt"
grep '^progress' "$work/out.txt" | sort -t' ' -k2,2n | diff -q - "$work/want.txt" > /dev/null \
    || { echo "progress lines lost or repeated:"; grep '^progress' "$work/out.txt"; exit 1; }
[[ "$got" == *" count=$n sum=$((n * (n - 1) / 2)) "* ]] || { echo "count or sum is not that of 0..$((n - 1))"; exit 1; }
rm -rf "$work"
echo "== ok: the restored JVM finished its $tasks tasks with the uninterrupted run's result"
