# python3 with subprocess and a multiprocessing pool of workers, its results checked against a direct run.
# usage: python3 pool.py STEPS
# Each step: a pool of 3 workers maps a function over a batch, and a subprocess (sha256sum) digests the batch's
# result through pipes. Prints "step N RESULT DIGEST".
import hashlib, multiprocessing, subprocess, sys, time

def work(x):
    return sum((x * k) % 9973 for k in range(2000))

if __name__ == "__main__":
    steps = int(sys.argv[1])
    with multiprocessing.Pool(3) as pool:
        for n in range(steps):
            res = pool.map(work, range(n * 8, n * 8 + 8))
            out = subprocess.run(["sha256sum"], input=repr(res).encode(), stdout=subprocess.PIPE, check=True).stdout
            print(f"step {n} {sum(res)} {out.split()[0].decode()[:16]}", flush=True)
            time.sleep(0.05)
    print("done", flush=True)
