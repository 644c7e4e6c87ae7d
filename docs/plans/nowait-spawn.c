/* A model for docs/plans/spawner-model.py's mode C, not spoolq code: start a program
 * without waiting for its exec. glibc's posix_spawn clones with CLONE_VM | CLONE_VFORK, so
 * the caller sleeps until the child has exec'd; here the clone has CLONE_VM only, the
 * child runs on its own stack, and an exec error comes back through a close-on-exec pipe
 * that the caller reads after the reap.
 *
 * Only a model: the child calls libc's syscall(), which sets errno, and errno is the
 * parent's thread-local variable (the child shares its memory and TLS). A real version
 * would make raw system calls or give the child its own TLS. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define STACK (64 * 1024)

struct args { const char *path; char *const *argv; char *const *envp; int errw; };

static int child(void *p) {
    struct args *a = p;
    for (int s = 1; s < 65; s++) {  /* handlers back to default: the parent's are its own */
        if (s == SIGKILL || s == SIGSTOP) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        syscall(SYS_rt_sigaction, s, &sa, NULL, 8);
    }
    syscall(SYS_setsid);
    sigset_t empty;
    sigemptyset(&empty);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &empty, NULL, 8);
    syscall(SYS_execve, a->path, a->argv, a->envp);
    int e = errno;
    syscall(SYS_write, a->errw, &e, sizeof e);
    syscall(SYS_exit, 127);
    return 0;
}

/* The pid, or -errno. Keep argv, envp and argsbuf (>= sizeof(struct args)) alive, and free
 * *stack_out with free_stack, only after the child is reaped; read *errr then. */
int spawn_nowait(const char *path, char *const *argv, char *const *envp, void **stack_out,
                 int *errr, void *argsbuf) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    void *stk = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stk == MAP_FAILED) return -errno;
    struct args *a = argsbuf;
    a->path = path; a->argv = argv; a->envp = envp; a->errw = p[1];
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);  /* no handler runs in the child before its reset */
    int pid = clone(child, (char *)stk + STACK, CLONE_VM | SIGCHLD, a);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(p[1]);
    if (pid < 0) { munmap(stk, STACK); close(p[0]); return -e; }
    *stack_out = stk;
    *errr = p[0];
    return pid;
}

void free_stack(void *s) { munmap(s, STACK); }
