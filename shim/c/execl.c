/* The exec functions that take their arguments as a C variadic list (Rust cannot define those): gather the
 * arguments into an array and hand over to the shim's Rust hooks, which keep the job's environment. The
 * exported execl, execlp and execle are naked Rust functions that jump here (processes.rs). */
#include <stdarg.h>
#include <stddef.h>

extern int vos_execve(const char *path, char *const argv[], char *const envp[]);
extern int vos_execvpe(const char *file, char *const argv[], char *const envp[]);
extern char **environ;

#define MAXARGS 4096

#define GATHER(first, argv, ap)                                   \
    do {                                                          \
        int n = 0;                                                \
        argv[n++] = (char *)(first);                              \
        while (n < MAXARGS && (argv[n++] = va_arg(ap, char *)))   \
            ;                                                     \
        argv[MAXARGS - 1] = NULL;                                 \
    } while (0)

int vos_c_execl(const char *path, const char *arg, ...) {
    char *argv[MAXARGS];
    va_list ap;
    va_start(ap, arg);
    GATHER(arg, argv, ap);
    va_end(ap);
    return vos_execve(path, argv, environ);
}

int vos_c_execlp(const char *file, const char *arg, ...) {
    char *argv[MAXARGS];
    va_list ap;
    va_start(ap, arg);
    GATHER(arg, argv, ap);
    va_end(ap);
    return vos_execvpe(file, argv, environ);
}

int vos_c_execle(const char *path, const char *arg, ...) {
    char *argv[MAXARGS];
    va_list ap;
    va_start(ap, arg);
    GATHER(arg, argv, ap);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return vos_execve(path, argv, envp);
}
