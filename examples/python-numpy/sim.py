# A long, deterministic computation that keeps all its state in memory: numpy arrays (a random recurrent network
# driven by a seeded generator, its state folded into a 2-D field) and, beside them, pure-Python state (a Rule 110
# automaton in a list, a dict of counts, a big integer). Prints one progress line per step, then hashes of the final
# state: a run checkpointed and restored midway must print the same hashes as one left alone.
import hashlib, sys
import numpy as np

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
rng = np.random.default_rng(20240611)
n = 400
W = rng.standard_normal((n, n)) / np.sqrt(n)
x = rng.standard_normal((n, n))
field = np.zeros((n, n))

cells = [0] * 400 + [1]                  # pure Python: Rule 110, a dict of pattern counts, a growing integer
counts = {}
big = 1

for step in range(1, steps + 1):
    x = np.tanh(1.3 * (W @ x) + 0.05 * rng.standard_normal(x.shape))
    field = 0.9 * field + 0.1 * np.roll(x, step % 7, axis=1)
    for _ in range(30):
        cells = [(110 >> (4 * cells[i - 1] + 2 * cells[i] + cells[(i + 1) % len(cells)])) & 1 for i in range(len(cells))]
        key = "".join(map(str, cells[:12]))
        counts[key] = counts.get(key, 0) + 1
    big = big * (step + 7919) + sum(cells)
    print(f"step {step}/{steps} field_mean={field.mean():+.9f} alive={sum(cells)} patterns={len(counts)}", flush=True)

print("numpy-result", hashlib.sha256(x.tobytes() + field.tobytes()).hexdigest()[:16],
      "rng-next", rng.integers(1 << 62))
print("python-result", hashlib.sha256(repr((cells, sorted(counts.items()), big)).encode()).hexdigest()[:16])
