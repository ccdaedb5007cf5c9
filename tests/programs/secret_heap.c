/* A job with something to hide: a 64-byte random secret in its heap, and 4 MiB of heap filled with a known
 * 32-byte pattern (a long run to look for in a packet capture).
 * usage: secret_heap
 * Prints "secret HEX" once ready. SIGUSR2: prints "secret HEX" again from its memory and "pattern ok" or
 * "pattern CORRUPT". */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#define PATTERN "vOS capture test: heap pattern!!"
#define PATTERN_BYTES (4 << 20)

static volatile sig_atomic_t want;
static void on2(int s) { (void)s; want = 1; }

static void show(const unsigned char *secret) {
    printf("secret ");
    for (int i = 0; i < 64; i++) printf("%02x", secret[i]);
    printf("\n");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char *secret = malloc(64);
    char *heap = malloc(PATTERN_BYTES);
    if (!secret || !heap || getrandom(secret, 64, 0) != 64) return 1;
    for (size_t i = 0; i < PATTERN_BYTES; i += 32) memcpy(heap + i, PATTERN, 32);
    signal(SIGUSR2, on2);
    show(secret);
    for (;;) {
        if (want) {
            want = 0;
            show(secret);
            int ok = 1;
            for (size_t i = 0; i < PATTERN_BYTES; i += 32) ok &= memcmp(heap + i, PATTERN, 32) == 0;
            printf(ok ? "pattern ok\n" : "pattern CORRUPT\n");
        }
        usleep(10000);
    }
}
