#!/bin/bash
# A shell pipeline: a slow generator | sort | sha256sum, its result in OUT.
# usage: pipeline.sh OUT COUNT
gen() {
    for ((i = 0; i < $2; i++)); do
        echo $(( (i * 7919) % 100003 ))
        (( i % 500 == 0 )) && sleep 0.05
    done
}
gen "$1" "$2" | sort -n | sha256sum > "$1.tmp"
mv "$1.tmp" "$1"
echo done
