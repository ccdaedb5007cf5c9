#!/usr/bin/env bash
# Demo: an interactive sqlite3 shell in tmux, in the middle of a transaction with a temp table, is checkpointed,
# killed and restored in another tmux window; there the transaction commits and the rows reach the database.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
need sqlite3:sqlite3 tmux:tmux
work="$(mktemp -d /tmp/vos-sqlite.XXXXXX)"
db="$work/shop.db"
t="tmux -L vos-sqlite-$$"
trap '$t kill-server 2>/dev/null || true' EXIT
# tmux takes a ';' ending an argument for its own command separator: escape it.
type_in() { local win=$1; shift; for c in "$@"; do $t send-keys -t "$win" "${c/%;/\\;}" Enter; done; }
wait_for() { for _ in $(seq 100); do $t capture-pane -p -t "$1" | grep -q -- "$2" && return 0; sleep 0.1; done; echo "no '$2' in pane $1"; exit 1; }

echo "== sqlite3 under vrun in tmux: a table, an open transaction, a temp table"
$t new-session -d -s demo -x 120 -y 30 "cd $work && $vrun --name sqlite --dir $work sqlite3 $db; sleep 600"
wait_for demo:0 "sqlite>"
type_in demo:0 "CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT);" "BEGIN;" \
    "INSERT INTO orders(item) VALUES ('apples'),('pears'),('plums');" "CREATE TEMP TABLE note AS SELECT 'still here' AS msg;" \
    "SELECT 'ready';"
wait_for demo:0 "^ready"
[ "$(sqlite3 "$db" 'SELECT count(*) FROM orders;')" = 0 ] || { echo "the transaction is not open"; exit 1; }
echo "== checkpoint and kill it (the transaction is still open)"
img="$("$vrun" checkpoint sqlite --kill --quiet)"
echo "   image: $img"
echo "== restore it in another tmux window, then commit there"
$t new-window -t demo "cd $work && $vrun restore $img; sleep 600"
sleep 1
type_in demo:1 "SELECT msg FROM note;" "COMMIT;" "SELECT 'committed ' || count(*) FROM orders;"
wait_for demo:1 "^committed 3"
$t capture-pane -p -t demo:1 | grep -v '^$' | tail -6 | sed 's/^/   /'
[ "$(sqlite3 "$db" 'SELECT group_concat(item) FROM orders;')" = "apples,pears,plums" ] || { echo "the rows did not reach the database"; exit 1; }
$t capture-pane -p -t demo:1 | grep -q "^still here" || { echo "the temp table is lost"; exit 1; }
echo "== ok: the restored shell kept its transaction and temp table; the commit reached $db"
