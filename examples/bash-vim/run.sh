#!/usr/bin/env bash
# Demo: an interactive bash in tmux with a background job, and vim in it editing a file with unsaved changes, is
# checkpointed, killed and restored in another tmux window: vim redraws with the unsaved text still in its buffer
# (saved there to prove it), and once vim quits, `jobs` in the same shell still lists the background job.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
need vim:vim tmux:tmux
work="$(mktemp -d /tmp/vos-vim.XXXXXX)"
t="tmux -L vos-vim-$$"
trap '$t kill-server 2>/dev/null || true' EXIT
wait_for() { for _ in $(seq 100); do $t capture-pane -p -t "$1" | grep -q -- "$2" && return 0; sleep 0.1; done; echo "no '$2' in pane $1"; $t capture-pane -p -t "$1"; exit 1; }

echo "== bash under vrun in tmux: a background job, then vim with unsaved text"
$t new-session -d -s demo -x 100 -y 30 "cd $work && $vrun --name vim-demo-$$ --dir $work bash --norc --noprofile -i; sleep 600"
$t send-keys -t demo:0 "PS1='demo\$ '" Enter
wait_for demo:0 '^demo\$'
$t send-keys -t demo:0 "sleep 1000 &" Enter "vim notes.txt" Enter
wait_for demo:0 "notes.txt"
$t send-keys -t demo:0 "i" "written before the checkpoint, never saved" Escape
wait_for demo:0 "^written before"
[ ! -e "$work/notes.txt" ] || { echo "the text was saved already"; exit 1; }
echo "== checkpoint and kill the whole job: bash, sleep and vim"
img="$("$vrun" checkpoint vim-demo-$$ --kill --quiet)"
echo "   image: $img"
echo "== restore it in another tmux window"
$t new-window -t demo "cd $work && $vrun restore $img; sleep 600"
wait_for demo:1 "^written before"
$t capture-pane -p -t demo:1 | grep -v '^$' | head -3 | sed 's/^/   /'
echo "== in vim: add a line, save, quit; then ask the shell for its jobs"
$t send-keys -t demo:1 "o" "added after the restore" Escape ":wq" Enter
wait_for demo:1 '^demo\$'
$t send-keys -t demo:1 "jobs" Enter
wait_for demo:1 "sleep 1000"
$t capture-pane -p -t demo:1 | grep -v '^$' | tail -3 | sed 's/^/   /'
printf 'written before the checkpoint, never saved\nadded after the restore\n' | cmp -s - "$work/notes.txt" || { echo "the buffer was not kept:"; cat "$work/notes.txt"; exit 1; }
echo "== ok: vim kept its unsaved text, and the restored shell still has its background job"
