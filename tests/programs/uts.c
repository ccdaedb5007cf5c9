/* The job's host name and NIS domain name, as the job sees them.
 * usage: uts STEPS
 * At every step prints "step N HOSTNAME DOMAINNAME" (gethostname, getdomainname and uname must agree), then
 * sleeps 20 ms. Exits 99 with a MISMATCH line if the three disagree. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    long steps = atol(argv[1]);
    for (long s = 0; s < steps; s++) {
        char host[256], dom[256];
        struct utsname u;
        if (gethostname(host, sizeof host) || getdomainname(dom, sizeof dom) || uname(&u)) { perror("uts"); return 2; }
        if (strcmp(host, u.nodename) || strcmp(dom, u.domainname)) {
            printf("MISMATCH step %ld: gethostname %s / uname %s, getdomainname %s / uname %s\n", s, host, u.nodename, dom, u.domainname);
            return 99;
        }
        printf("step %ld %s %s\n", s, host, dom);
        fflush(stdout);
        nanosleep(&(struct timespec){0, 20000000}, 0);
    }
    printf("done\n");
    return 0;
}
