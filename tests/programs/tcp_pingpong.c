/* A parent and a child exchanging numbered messages over a TCP connection on loopback (the parent listens, the
 * child connects), in both directions, always with several messages in flight; and over a pair of connected UDP
 * sockets, one datagram per step, answered at once (a datagram may be lost, never repeated or reordered).
 * usage: tcp_pingpong PORT STEPS
 * The parent prints "step k"; either side exits 99 on a lost, repeated or reordered TCP message. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define LAG 5

#include "numbered.h"

static struct sockaddr_in at(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void run(const char *who, int fd, long steps, int talk) {
    for (long k = 0; k < steps + LAG; k++) {
        if (k < steps) put(fd, k);
        if (k >= LAG) {
            int64_t v = get(fd);
            if (v != k - LAG) { printf("%s: expected %ld, got %ld\n", who, k - LAG, (long)v); exit(99); }
        }
        if (talk && k >= LAG) printf("step %ld\n", k - LAG);
        usleep(15000);
    }
}

int main(int argc, char **argv) {
    int port = atoi(argv[1]);
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = at(port);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) { perror("listen"); return 2; }
    pid_t child = fork();
    if (child == 0) {
        close(l);
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 2; }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        run("child", c, steps, 0);
        return 0;
    }
    int c = accept(l, 0, 0);
    if (c < 0) { perror("accept"); return 2; }
    run("parent", c, steps, 1);
    int nodelay = 0;
    socklen_t len = sizeof nodelay;
    int status;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { printf("child ended with status %#x\n", status); return 99; }
    /* The listener is still there, on the same port, with its options. */
    int reuse = 0;
    len = sizeof reuse;
    getsockopt(l, SOL_SOCKET, SO_REUSEADDR, &reuse, &len);
    struct sockaddr_in b;
    len = sizeof b;
    getsockname(l, (struct sockaddr *)&b, &len);
    if (ntohs(b.sin_port) != port || !reuse) { printf("listener port %d reuseaddr %d\n", ntohs(b.sin_port), reuse); return 99; }
    (void)nodelay;
    printf("done\n");
    return 0;
}
