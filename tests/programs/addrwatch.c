/* A job that cannot bear another host: it notes its IPv4 addresses at start and, each step, exits with status 3
 * if they changed (a migration to a host with another address). Prints "step N".
 * usage: addrwatch STEPS */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void addrs(char *out, size_t n) {
    struct ifaddrs *ifa, *i;
    out[0] = 0;
    if (getifaddrs(&ifa)) return;
    for (i = ifa; i; i = i->ifa_next)
        if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET) {
            char b[64];
            inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, b, sizeof b);
            strncat(out, b, n - strlen(out) - 2);
            strcat(out, " ");
        }
    freeifaddrs(ifa);
}

int main(int argc, char **argv) {
    long steps = strtol(argv[1], 0, 10);
    char first[512], now[512];
    addrs(first, sizeof first);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long s = 0; s < steps; s++) {
        addrs(now, sizeof now);
        if (strcmp(now, first)) { printf("moved: %s-> %s\n", first, now); return 3; }
        printf("step %ld\n", s);
        usleep(50000);
    }
    printf("done\n");
    return 0;
}
