# A long computation that keeps its state in memory: a running sum of squares.
import sys, time
total = 0
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10**9):
    total += i * i
    print(f"i={i} total={total}", flush=True)
    time.sleep(0.05)
