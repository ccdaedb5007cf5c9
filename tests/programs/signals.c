/* Signal handlers on an alternate stack, a blocked pending signal, and the app's own use of vOS's signals.
 * usage: signals GOFILE STEPS
 * SIGUSR1 runs on the alternate stack (checked) and counts; SIGUSR2 is blocked and raised once at start, so it
 * stays pending; SIGRTMAX-1 (vOS's trigger number) gets the app's own handler and is raised by the app itself.
 * Once GOFILE exists, SIGUSR2 is unblocked: its handler must run exactly then, exactly once. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char alt[65536];
static volatile sig_atomic_t usr1, usr2, rt, onalt_bad;

static void on_usr1(int s) {
    char here;
    if (&here < alt || &here >= alt + sizeof alt) onalt_bad = 1;
    usr1++;
}
static void on_usr2(int s) { usr2++; }
static void on_rt(int s, siginfo_t *si, void *uc) { rt++; }

int main(int argc, char **argv) {
    long steps = strtol(argv[2], 0, 10);
    setvbuf(stdout, NULL, _IOLBF, 0);
    stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt, .ss_flags = 0};
    sigaltstack(&ss, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK | SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_usr2;
    sa.sa_flags = 0;
    sigaction(SIGUSR2, &sa, 0);
    struct sigaction rsa = {0};
    rsa.sa_sigaction = on_rt;
    rsa.sa_flags = SA_SIGINFO;
    sigaction(SIGRTMAX - 1, &rsa, 0);
    struct sigaction back;
    sigaction(SIGRTMAX - 1, 0, &back);
    if (back.sa_sigaction != on_rt) { printf("VIRTUAL SIGACTION BROKEN\n"); return 99; }
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m, 0);
    raise(SIGUSR2);
    int unblocked = 0;
    for (long s = 0; s < steps; s++) {
        raise(SIGUSR1);
        raise(SIGRTMAX - 1);
        if (onalt_bad) { printf("HANDLER NOT ON ALTSTACK\n"); return 99; }
        if (usr1 != s + 1 || rt != s + 1) { printf("COUNTS usr1 %d rt %d at step %ld\n", (int)usr1, (int)rt, s); return 99; }
        stack_t cur;
        sigaltstack(0, &cur);
        if (cur.ss_sp != alt || cur.ss_size != sizeof alt) { printf("ALTSTACK LOST\n"); return 99; }
        sigset_t pend;
        sigpending(&pend);
        if (!unblocked && (!sigismember(&pend, SIGUSR2) || usr2 != 0)) { printf("PENDING SIGUSR2 LOST\n"); return 99; }
        if (!unblocked && access(argv[1], F_OK) == 0) {
            sigprocmask(SIG_UNBLOCK, &m, 0);
            unblocked = 1;
            printf("usr2 %d\n", (int)usr2);
        }
        printf("step %ld\n", s);
        usleep(20000);
    }
    if (!unblocked || usr2 != 1) { printf("USR2 delivered %d times\n", (int)usr2); return 99; }
    printf("done\n");
    return 0;
}
