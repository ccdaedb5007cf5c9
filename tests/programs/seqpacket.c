/* A unix seqpacket pair with messages queued (one of them empty) and its writing end shut down (SHUT_WR).
 * usage: seqpacket STEPS
 * Before step 0 the writer queues the messages and shuts down; the program then only counts steps. At the end the
 * reader takes the queue with SO_PASSCRED on (each message carries credentials, end of file none): exactly the
 * messages, boundaries and empty one included, then end of file, twice (the shutdown stays); and the other
 * direction still carries a message. Exits 99 with a MISMATCH line on any difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *msgs[] = {"alpha", "", "gamma-gamma", "d", ""};
#define NMSGS (sizeof msgs / sizeof *msgs)

/* One message (its length; -2 end of file, -1 error), and whether it came with credentials. */
static long take(int fd, char *buf, size_t len, int *creds) {
    char cbuf[CMSG_SPACE(sizeof(struct ucred))];
    struct iovec iov = {buf, len};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    long n = recvmsg(fd, &m, MSG_DONTWAIT);
    *creds = m.msg_controllen > 0 && CMSG_FIRSTHDR(&m) && CMSG_FIRSTHDR(&m)->cmsg_type == SCM_CREDENTIALS;
    if (n < 0) return -1;
    if (m.msg_flags & MSG_TRUNC) return -3;
    return n == 0 && !*creds ? -2 : n;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    long steps = atol(argv[1]);
    setvbuf(stdout, 0, _IOLBF, 0);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv)) { perror("socketpair"); return 2; }
    for (size_t i = 0; i < NMSGS; i++)
        if (send(sv[1], msgs[i], strlen(msgs[i]), 0) != (long)strlen(msgs[i])) { perror("send"); return 2; }
    if (shutdown(sv[1], SHUT_WR)) { perror("shutdown"); return 2; }
    for (long s = 0; s < steps; s++) {
        printf("step %ld\n", s);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    int one = 1;
    if (setsockopt(sv[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof one)) { perror("SO_PASSCRED"); return 2; }
    char buf[256];
    int creds;
    for (size_t i = 0; i < NMSGS; i++) {
        long n = take(sv[0], buf, sizeof buf, &creds);
        if (n != (long)strlen(msgs[i]) || memcmp(buf, msgs[i], n)) {
            printf("MISMATCH message %zu: got %ld bytes (%.*s), wanted \"%s\"\n", i, n, n > 0 ? (int)n : 0, buf, msgs[i]);
            return 99;
        }
    }
    for (int k = 0; k < 2; k++) {
        long n = take(sv[0], buf, sizeof buf, &creds);
        if (n != -2) { printf("MISMATCH after the queue: %ld (errno %d), not end of file\n", n, errno); return 99; }
    }
    if (send(sv[0], "back", 4, 0) != 4) { printf("MISMATCH sending back: %s\n", strerror(errno)); return 99; }
    if (recv(sv[1], buf, sizeof buf, MSG_DONTWAIT) != 4 || memcmp(buf, "back", 4)) { printf("MISMATCH receiving back\n"); return 99; }
    if (send(sv[1], "x", 1, MSG_NOSIGNAL) != -1 || errno != EPIPE) { printf("MISMATCH: the shut down end could send\n"); return 99; }
    printf("done\n");
    return 0;
}
