// Credentials and sandbox tests: `creds DIR [filter|badfilter]` prints "step N" every 50 ms, 2000 steps. With
// "filter" it first installs two seccomp filters as libseccomp would (architecture checked): the older makes mkdir
// and mkdirat fail with EPERM, the newer mkdirat with EACCES (so mkdirat shows which filter the kernel asks first:
// the newest). With "badfilter" its filter kills the process on socket(). On request (a file appearing in DIR) it
// acts and reports in DIR:
//   DIR/exec  -> runs a child shell that writes its own /proc status lines and `setpriv -d` to DIR/child.txt
//   DIR/mkdir -> tries mkdir and mkdirat, writes "mkdir=ERR mkdirat=ERR" to DIR/mkdir.txt
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void install(struct sock_filter *f, unsigned short n) {
    struct sock_fprog p = {n, f};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &p) != 0) {
        perror("seccomp");
        exit(1);
    }
}

static void filters(void) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("no_new_privs");
        exit(1);
    }
    struct sock_filter a[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mkdir, 1, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mkdirat, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_filter b[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mkdirat, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EACCES),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    install(a, sizeof a / sizeof a[0]);
    install(b, sizeof b / sizeof b[0]);
}

static int take(const char *dir, const char *what) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, what);
    return unlink(p) == 0;
}

static const char *err(long r) {
    if (r == 0) return "ok";
    return errno == EPERM ? "EPERM" : errno == EACCES ? "EACCES" : errno == EEXIST ? "EEXIST" : strerror(errno);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *dir = argv[1];
    if (argc > 2 && strcmp(argv[2], "filter") == 0) filters();
    if (argc > 2 && strcmp(argv[2], "badfilter") == 0) {
        // A filter that kills the process on socket(): the shim needs socket() at a checkpoint.
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        struct sock_filter k[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socket, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        install(k, sizeof k / sizeof k[0]);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < 2000; i++) {
        printf("step %d\n", i);
        if (take(dir, "exec")) {
            pid_t c = fork();
            if (c == 0) {
                char cmd[8192];
                snprintf(cmd, sizeof cmd, "{ grep -E '^(Uid|Gid|Groups|Cap|NoNewPrivs|Seccomp)' /proc/self/status; setpriv -d; } > %s/child.tmp && mv %s/child.tmp %s/child.txt", dir, dir, dir);
                execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
                _exit(127);
            }
            waitpid(c, NULL, 0);
        }
        if (take(dir, "mkdir")) {
            char d[4096], out[4096], tmp[4096];
            snprintf(d, sizeof d, "%s/newdir", dir);
            long r1 = syscall(SYS_mkdir, d, 0755);
            const char *e1 = err(r1);
            long r2 = syscall(SYS_mkdirat, AT_FDCWD, d, 0755);
            const char *e2 = err(r2);
            snprintf(tmp, sizeof tmp, "%s/mkdir.tmp", dir);
            snprintf(out, sizeof out, "%s/mkdir.txt", dir);
            FILE *f = fopen(tmp, "w");
            if (f) {
                fprintf(f, "mkdir=%s mkdirat=%s\n", e1, e2);
                fclose(f);
                rename(tmp, out);
            }
        }
        struct timespec t = {0, 50 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
    printf("done\n");
    return 0;
}
