# A stateful Python loop: a growing list, a dict of counters and a running hash.
# usage: python3 stateful.py STEPS
# Prints "step N h H" where H is a hash of all state so far; the harness recomputes it.
import hashlib, sys, time
steps = int(sys.argv[1])
state, counts, h = [], {}, hashlib.sha256()
for i in range(steps):
    state.append(i * i % 1009)
    counts[i % 17] = counts.get(i % 17, 0) + state[-1]
    h.update(repr((i, state[-1], counts[i % 17])).encode())
    print(f"step {i} h {h.hexdigest()[:16]}", flush=True)
    time.sleep(0.02)
print("done", flush=True)
