// A deterministic, multithreaded workload: a fixed pool of worker threads takes TASKS tasks; each walks its
// slice of the numbers 0..N-1 and, for every n, merges into two ConcurrentHashMaps shared by all workers:
// how many numbers fall on key n % KEYS and their sum, and the Collatz step count of n+1 per key.
// The result does not depend on how the tasks interleave; progress lines tell how far it is.
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicInteger;

public class Tally {
    static final int KEYS = 1000;

    static int collatz(long x) {
        int steps = 0;
        while (x != 1) { x = (x & 1) == 0 ? x >> 1 : 3 * x + 1; steps++; }
        return steps;
    }

    public static void main(String[] args) throws Exception {
        int tasks = Integer.parseInt(args[0]), per = Integer.parseInt(args[1]), workers = Integer.parseInt(args[2]);
        ConcurrentHashMap<Integer, long[]> sums = new ConcurrentHashMap<>();   // key -> {count, sum of n}
        ConcurrentHashMap<Integer, Long> steps = new ConcurrentHashMap<>();    // key -> Collatz steps
        AtomicInteger done = new AtomicInteger();
        ExecutorService pool = Executors.newFixedThreadPool(workers);
        for (int t = 0; t < tasks; t++) {
            final long from = (long) t * per, to = from + per;
            pool.submit(() -> {
                for (long n = from; n < to; n++) {
                    int key = (int) (n % KEYS);
                    final long v = n;
                    sums.compute(key, (k, a) -> a == null ? new long[] {1, v} : new long[] {a[0] + 1, a[1] + v});
                    steps.merge(key, (long) collatz(n + 1), Long::sum);
                }
                int d = done.incrementAndGet();
                if (d % Math.max(1, tasks / 20) == 0) System.out.println("progress " + d + "/" + tasks + " tasks");
            });
        }
        pool.shutdown();
        pool.awaitTermination(1, TimeUnit.HOURS);
        long count = 0, sum = 0, allSteps = 0, digest = 0;
        for (int k = 0; k < KEYS; k++) {
            long[] a = sums.getOrDefault(k, new long[2]);
            long s = steps.getOrDefault(k, 0L);
            count += a[0]; sum += a[1]; allSteps += s;
            digest = digest * 1_000_003L + a[0] * 31 + a[1] * 17 + s;
        }
        System.out.println("result keys=" + sums.size() + " count=" + count + " sum=" + sum + " steps=" + allSteps + " digest=" + digest);
    }
}
