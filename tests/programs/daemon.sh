#!/bin/bash
# A daemon that leaves its parent on purpose (double fork, own session), writing numbered lines to FILE, while
# the main script waits for it to finish.
# usage: daemon.sh FILE COUNT
( setsid bash -c 'for ((i = 1; i <= '"$2"'; i++)); do echo "d $i" >> "'"$1"'"; sleep 0.05; done; echo end >> "'"$1"'"' & )
until grep -q '^end$' "$1" 2>/dev/null; do sleep 0.05; done
echo done
