#!/usr/bin/env bash
# Demo: an interactive python3 REPL in tmux, holding a dict, a list, a function, a class instance and a partly
# consumed generator, is checkpointed, killed and restored in another tmux window: there every variable is still
# there with its value, readline's history too (Up reruns the last line), the generator goes on with its next item,
# and the REPL takes new definitions.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
need /usr/bin/python3:python3 tmux:tmux
work="$(mktemp -d /tmp/vos-pyrepl.XXXXXX)"
t="tmux -L vos-pyrepl-$$"
job="pyrepl-$$"
trap '$t kill-server 2>/dev/null || true; rm -rf "$work"' EXIT
type_in() { local win=$1; shift; for c in "$@"; do $t send-keys -t "$win" -l "$c"; $t send-keys -t "$win" Enter; done; }
wait_for() { for _ in $(seq 100); do $t capture-pane -p -t "$1" | grep -q -- "$2" && return 0; sleep 0.1; done; echo "no '$2' in pane $1:"; $t capture-pane -p -t "$1"; exit 1; }
wait_prompt() { for _ in $(seq 100); do [ "$($t capture-pane -p -t "$1" | grep -v '^$' | tail -1)" = ">>>" ] && return 0; sleep 0.1; done; echo "no prompt in pane $1:"; $t capture-pane -p -t "$1"; exit 1; }
# Type each line once the REPL is back at its prompt, as a person does (the terminal echoes lines typed ahead
# while the REPL runs, mixed into its output).
do_in() {
    local win=$1 c before; shift
    for c in "$@"; do
        before="$($t capture-pane -p -t "$win")"
        type_in "$win" "$c"
        for _ in $(seq 100); do [ "$($t capture-pane -p -t "$win")" != "$before" ] && break; sleep 0.05; done
        wait_prompt "$win"
    done
}
# One line that sums up the REPL's state; the same line must come out before the checkpoint and after the restore.
state='print("state", sum(inventory.values()), len(primes), sum(primes), area(2), c.n, sum(squares.values()))'
expect="^state 15 17 440 12.566 3 333328333350000$"

echo "== python3 REPL under vrun in tmux: a dict, a list, a function, a class instance, a generator half consumed"
$t new-session -d -s demo -x 120 -y 30 "cd $work && $vrun --name $job --dir $work /usr/bin/python3 -q; sleep 600"
wait_for demo:0 "^>>>"
do_in demo:0 'inventory = {"apples": 3, "pears": 5, "plums": 7}' \
    'primes = [p for p in range(2, 60) if all(p % d for d in range(2, p))]'
type_in demo:0 'def area(r): return round(3.14159 * r * r, 3)'
do_in demo:0 ''
type_in demo:0 'class Counter:' '    def __init__(self): self.n = 0' '    def tick(self): self.n += 1; return self.n'
do_in demo:0 '' 'c = Counter(); c.tick(); c.tick(); c.tick()' \
    'squares = {i: i * i for i in range(100000)}' \
    'gen = (n * n for n in range(100))' \
    '[next(gen) for _ in range(5)]' \
    "$state"
wait_for demo:0 "$expect"
$t capture-pane -p -t demo:0 | grep -v '^$' | tail -4 | sed 's/^/   /'
echo "== checkpoint and kill it"
img="$("$vrun" checkpoint $job --kill --quiet)"
echo "   image: $img ($(du -h "$img" | cut -f1))"
sleep 0.5
$t capture-pane -p -t demo:0 | grep -q "^>>>" || { echo "the REPL window lost its prompt"; exit 1; }
echo "== restore it in another tmux window; rerun the last line (Up, Enter), go on with the generator, define more"
$t new-window -t demo "cd $work && $vrun restore $img; echo restore exited \$?; sleep 600"
# First an empty line: the REPL answers with a prompt once it runs (a line typed earlier would be echoed by the
# terminal, and mixed into the REPL's output, before the restored REPL takes it). Then Up: readline's history.
do_in demo:1 ''
$t send-keys -t demo:1 Up Enter
wait_for demo:1 "^state "
wait_prompt demo:1
do_in demo:1 'print("next", next(gen), next(gen))'
type_in demo:1 'def cube(x): return x ** 3'
do_in demo:1 '' 'print("new", cube(c.tick()), inventory.setdefault("figs", 11), sorted(inventory))'
$t capture-pane -p -t demo:1 | grep -v '^$' | tail -9 | sed 's/^/   /'
pane="$($t capture-pane -p -t demo:1)"
grep -q "$expect" <<<"$pane" || { echo "the REPL's variables were not kept:"; echo "$pane"; exit 1; }
grep -q "^next 25 36$" <<<"$pane" || { echo "the generator did not go on where it was"; exit 1; }
grep -q "^new 64 11 \['apples', 'figs', 'pears', 'plums'\]$" <<<"$pane" || { echo "the restored REPL did not take new code"; exit 1; }
type_in demo:1 'exit()'
wait_for demo:1 "^restore exited 0$"
echo "== ok: the restored python3 REPL kept its variables, function, class instance and generator, and took new code"
