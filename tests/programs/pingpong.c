/* A parent and a child exchanging numbered messages over pipes and socketpairs, in both directions, always with
 * several messages in flight.
 * usage: pingpong STEPS
 * At step k each side sends k on every outgoing channel (a pipe, a SOCK_STREAM and a SOCK_SEQPACKET socketpair)
 * and receives k - LAG on every incoming one, checking it is exactly the next number. The parent prints
 * "step k"; either side exits 99 on a lost, repeated or reordered message. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define LAG 5

#include "numbered.h"

/* out[0..3] are written, in[0..3] read. */
static void run(const char *who, int out[3], int in[3], long steps, int talk) {
    for (long k = 0; k < steps + LAG; k++) {
        if (k < steps)
            for (int c = 0; c < 3; c++) put(out[c], k);
        if (k >= LAG)
            for (int c = 0; c < 3; c++) {
                int64_t v = get(in[c]);
                if (v != k - LAG) { printf("%s: channel %d: expected %ld, got %ld\n", who, c, k - LAG, (long)v); exit(99); }
            }
        if (talk && k >= LAG) printf("step %ld\n", k - LAG);
        usleep(15000);
    }
}

int main(int argc, char **argv) {
    long steps = strtol(argv[1], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int p2c[2], c2p[2], st[2], sq[2];
    if (pipe(p2c) || pipe(c2p) || socketpair(AF_UNIX, SOCK_STREAM, 0, st) || socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq)) return 2;
    pid_t child = fork();
    if (child == 0) {
        int out[3] = {c2p[1], st[1], sq[1]}, in[3] = {p2c[0], st[1], sq[1]};
        close(p2c[1]); close(c2p[0]); close(st[0]); close(sq[0]);
        run("child", out, in, steps, 0);
        return 0;
    }
    int out[3] = {p2c[1], st[0], sq[0]}, in[3] = {c2p[0], st[0], sq[0]};
    close(p2c[0]); close(c2p[1]); close(st[1]); close(sq[1]);
    run("parent", out, in, steps, 1);
    int status;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { printf("child ended with status %#x\n", status); return 99; }
    printf("done\n");
    return 0;
}
