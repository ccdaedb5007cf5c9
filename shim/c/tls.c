/* The one per-thread word the shim keeps: how far this thread's CPU-time clock must be moved forward after a
 * restore. Initial-exec TLS (the shim is loaded at startup, so it has static TLS): a new thread starts at 0. */
static __thread long long cpu_offset __attribute__((tls_model("initial-exec")));

long long vos_thread_cpu_offset(void) { return cpu_offset; }

void vos_set_thread_cpu_offset(long long v) { cpu_offset = v; }
