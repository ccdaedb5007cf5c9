/* A counter served over TCP and UDP on one port, to clients outside the job.
 * usage: counter_server PORT [BALLAST_MIB]
 * TCP: each line "inc" is answered with the counter's next value; "opt" with the options of the listener and of
 * this connection; "sum" with a checksum of BALLAST_MIB of pseudo-random memory filled at start. UDP: each datagram is answered with the counter's next value. Single-threaded, poll(). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 16

static int opt(int fd, int level, int name) {
    int v = 0;
    socklen_t len = sizeof v;
    getsockopt(fd, level, name, &v, &len);
    return v;
}

static unsigned long *ballast;
static size_t words;

static unsigned long checksum(void) {
    unsigned long h = 1469598103934665603ul;
    for (size_t i = 0; i < words; i++) h = (h ^ ballast[i]) * 1099511628211ul;
    return h;
}

int main(int argc, char **argv) {
    int port = atoi(argv[1]), one = 1, rcvbuf = 65536;
    long counter = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    words = (argc > 2 ? atol(argv[2]) : 0) << 17;
    ballast = malloc(words * sizeof *ballast + 1);
    unsigned long x = 88172645463325252ul;
    for (size_t i = 0; i < words; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; ballast[i] = x; }
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
    int l = socket(AF_INET6, SOCK_STREAM, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(l, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) { perror("listen"); return 2; }
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(u, (struct sockaddr *)&ua, sizeof ua)) { perror("udp bind"); return 2; }
    struct pollfd p[MAXC + 2] = {{.fd = l, .events = POLLIN}, {.fd = u, .events = POLLIN}};
    int n = 2;
    printf("listening on %d\n", port);
    for (;;) {
        if (poll(p, n, -1) < 0) continue;
        if (p[0].revents & POLLIN) {
            int c = accept(l, 0, 0);
            if (c >= 0 && n < MAXC + 2) {
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                p[n++] = (struct pollfd){.fd = c, .events = POLLIN};
            } else if (c >= 0) close(c);
        }
        if (p[1].revents & POLLIN) {
            char b[64];
            struct sockaddr_storage from;
            socklen_t fl = sizeof from;
            if (recvfrom(u, b, sizeof b, 0, (struct sockaddr *)&from, &fl) >= 0) {
                int k = snprintf(b, sizeof b, "%ld\n", ++counter);
                sendto(u, b, k, 0, (struct sockaddr *)&from, fl);
            }
        }
        for (int i = 2; i < n; i++) {
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char b[256];
            ssize_t k = read(p[i].fd, b, sizeof b - 1);
            if (k <= 0) {
                close(p[i].fd);
                p[i--] = p[--n];
                continue;
            }
            b[k] = 0;
            char out[256];
            int m;
            if (!strncmp(b, "opt", 3))
                m = snprintf(out, sizeof out, "reuseaddr %d keepalive %d rcvbuf %d nodelay %d\n", opt(l, SOL_SOCKET, SO_REUSEADDR),
                             opt(l, SOL_SOCKET, SO_KEEPALIVE), opt(l, SOL_SOCKET, SO_RCVBUF), opt(p[i].fd, IPPROTO_TCP, TCP_NODELAY));
            else if (!strncmp(b, "sum", 3))
                m = snprintf(out, sizeof out, "%lx\n", checksum());
            else
                m = snprintf(out, sizeof out, "%ld\n", ++counter);
            if (write(p[i].fd, out, m) != m) { close(p[i].fd); p[i--] = p[--n]; }
        }
    }
}
