#!/bin/bash
# Write N source files into DIR/src (and copy the Makefile), each with many small functions.
# usage: gen.sh DIR N FUNCS
set -e
dir=$1; n=$2; funcs=$3
mkdir -p "$dir/src"
cp "$(dirname "$0")/Makefile" "$dir/"
for ((f = 0; f < n; f++)); do
    {
        echo "#include <stdio.h>"
        for ((i = 0; i < funcs; i++)); do
            echo "int f${f}_$i(int x) { int s = x; for (int k = 0; k < $i % 17 + 3; k++) s = s * 31 + (k ^ $i); return s % 1000003; }"
        done
        echo "int part$f(void) { int s = 0;"
        for ((i = 0; i < funcs; i++)); do echo "  s += f${f}_$i($i);"; done
        echo "  return s; }"
    } > "$dir/src/part$f.c"
done
{
    echo "#include <stdio.h>"
    for ((f = 0; f < n; f++)); do echo "int part$f(void);"; done
    echo "int main(void) { long s = 0;"
    for ((f = 0; f < n; f++)); do echo "  s += part$f();"; done
    echo '  printf("%ld\n", s); return 0; }'
} > "$dir/src/main.c"
