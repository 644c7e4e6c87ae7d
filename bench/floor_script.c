/* The script floor loop of bench/floor.py (run_floor_script) in C: what spoolq's layout
 * costs per message with no interpreter at all, for `./bench/run floor --kind script`.
 *
 *   floor_script QUEUE_DIR LIST_FILE WIDTH PROGRAM
 *
 * LIST_FILE: one "bucket id" per line, the oldest first (bench/floor.py writes it from its
 * listing of que/). Per message, as the Python loop does: read msg (not parsed), a history
 * line and the rename into run/, job/ made, job/stdio.log opened with a header, the status
 * and reply pipes, posix_spawn of PROGRAM in job/ with fds 0-4 set, a pid file; at its exit
 * the pid file removed, a history line and the rename into done/. Every 10 ms a thread
 * fsyncs the buckets touched (done/, and que/ and run/ where renames are not atomic on
 * disk: argv[5] "unsafe"). Prints one JSON line: msg/s and CPU per message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MAXB 4096
static char *pending[MAXB];
static int npending;
static int stop;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what) { perror(what); exit(1); }

static void want_sync(const char *dir) {
    pthread_mutex_lock(&mu);
    for (int i = 0; i < npending; i++)
        if (strcmp(pending[i], dir) == 0) { pthread_mutex_unlock(&mu); return; }
    if (npending < MAXB) pending[npending++] = strdup(dir);
    pthread_mutex_unlock(&mu);
}

static void *syncer(void *arg) {
    (void)arg;
    struct timespec ten = {0, 10 * 1000 * 1000};
    for (;;) {
        char *batch[MAXB];
        int n, last;
        pthread_mutex_lock(&mu);
        n = npending;
        memcpy(batch, pending, sizeof(char *) * n);
        npending = 0;
        last = stop;
        pthread_mutex_unlock(&mu);
        for (int i = 0; i < n; i++) {
            int fd = open(batch[i], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (fd >= 0) { fsync(fd); close(fd); }
            free(batch[i]);
        }
        if (last && n == 0) return NULL;
        nanosleep(&ten, NULL);
    }
}

static void append(const char *path, const char *line) {
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) die(path);
    if (write(fd, line, strlen(line)) < 0) die("write");
    close(fd);
}

static const char *Q;
static int unsafe;

/* history line, rename src_state/bucket/id -> dst_state/bucket/id; the new path in out */
static void move(const char *src_state, const char *dst_state, const char *bucket, const char *id,
                 char *out, size_t outlen) {
    char src[4096], hist[4200], line[256];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(src, sizeof src, "%s/%s/%s/%s", Q, src_state, bucket, id);
    snprintf(hist, sizeof hist, "%s/history", src);
    snprintf(line, sizeof line, "{\"state\": \"%s\", \"at\": %ld.%06ld}\n", dst_state, (long)now.tv_sec,
             now.tv_nsec / 1000);
    append(hist, line);
    snprintf(out, outlen, "%s/%s/%s/%s", Q, dst_state, bucket, id);
    if (rename(src, out) != 0) {
        if (errno != ENOENT) die("rename");
        char d[4096], *p;
        snprintf(d, sizeof d, "%s/%s/%s", Q, dst_state, bucket);
        for (p = d + strlen(Q) + 1; (p = strchr(p, '/')) != NULL; p++) {
            *p = 0; mkdir(d, 0755); *p = '/';
        }
        mkdir(d, 0755);
        if (rename(src, out) != 0) die("rename");
    }
    if (unsafe) {
        char sb[4096];
        snprintf(sb, sizeof sb, "%s/%s/%s", Q, src_state, bucket);
        want_sync(sb);
    }
}

struct running { pid_t pid; char bucket[64]; char id[128]; char dir[4096]; int status_r, reply_w; };

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: floor_script QUEUE_DIR LIST_FILE WIDTH PROGRAM [unsafe]\n"); return 2; }
    Q = argv[1];
    int width = atoi(argv[3]);
    const char *prog = argv[4];
    unsafe = argc > 5 && strcmp(argv[5], "unsafe") == 0;
    FILE *lf = fopen(argv[2], "r");
    if (!lf) die(argv[2]);
    int cap = 1 << 16, n = 0;
    char (*ids)[2][128] = malloc(sizeof(*ids) * cap);
    while (fscanf(lf, "%127s %127s", ids[n][0], ids[n][1]) == 2) {
        if (++n == cap) { cap *= 2; ids = realloc(ids, sizeof(*ids) * cap); }
    }
    fclose(lf);
    char **env = environ;  /* as the daemon passes on its own, with one empty argument (bench/daemon.py NOOP_ARGV) */
    char *pargv[] = {(char *)prog, "", NULL};
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    struct running *run = calloc(width, sizeof *run);
    int inflight = 0, next = 0, finished = 0;
    pthread_t th;
    pthread_create(&th, NULL, syncer, NULL);
    struct rusage r0, c0, r1, c1;
    struct timespec t0, t1;
    getrusage(RUSAGE_SELF, &r0);
    getrusage(RUSAGE_CHILDREN, &c0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (finished < n) {
        while (next < n && inflight < width) {
            struct running *s = NULL;
            for (int i = 0; i < width; i++) if (run[i].pid == 0) { s = &run[i]; break; }
            const char *bucket = ids[next][0], *id = ids[next][1];
            next++;
            char path[4200], buf[65536];
            snprintf(path, sizeof path, "%s/que/%s/%s/msg", Q, bucket, id);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) die(path);
            if (read(fd, buf, sizeof buf) < 0) die("read msg");
            close(fd);
            move("que", "run", bucket, id, s->dir, sizeof s->dir);
            if (unsafe) {
                char rb[4096];
                snprintf(rb, sizeof rb, "%s/run/%s", Q, bucket);
                want_sync(rb);
            }
            char job[4200], logp[4300], pidp[4200];
            snprintf(job, sizeof job, "%s/job", s->dir);
            if (mkdir(job, 0777) != 0) die("mkdir job");
            snprintf(logp, sizeof logp, "%s/stdio.log", job);
            int log = open(logp, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
            if (log < 0) die("log");
            if (write(log, "RQ START\n", 9) < 0) die("write log");
            int st[2], rp[2];
            if (pipe2(st, O_CLOEXEC) || pipe2(rp, O_CLOEXEC)) die("pipe2");
            posix_spawn_file_actions_t fa;
            posix_spawn_file_actions_init(&fa);
            posix_spawn_file_actions_adddup2(&fa, devnull, 0);
            posix_spawn_file_actions_adddup2(&fa, log, 1);
            posix_spawn_file_actions_adddup2(&fa, log, 2);
            posix_spawn_file_actions_adddup2(&fa, st[1], 3);
            posix_spawn_file_actions_adddup2(&fa, rp[0], 4);
            posix_spawn_file_actions_addchdir_np(&fa, job);
            int err = posix_spawn(&s->pid, prog, &fa, NULL, pargv, env);
            posix_spawn_file_actions_destroy(&fa);
            if (err) { errno = err; die("posix_spawn"); }
            close(log); close(st[1]); close(rp[0]);
            s->status_r = st[0]; s->reply_w = rp[1];
            snprintf(s->bucket, sizeof s->bucket, "%s", bucket);
            snprintf(s->id, sizeof s->id, "%s", id);
            snprintf(pidp, sizeof pidp, "%s/pid", s->dir);
            char pl[32];
            snprintf(pl, sizeof pl, "%d\n", s->pid);
            append(pidp, pl);
            inflight++;
        }
        int status;
        pid_t pid = wait(&status);
        if (pid < 0) die("wait");
        for (int i = 0; i < width; i++) {
            struct running *s = &run[i];
            if (s->pid != pid) continue;
            close(s->status_r); close(s->reply_w);
            char pidp[4200], done[4096], db[4096];
            snprintf(pidp, sizeof pidp, "%s/pid", s->dir);
            unlink(pidp);
            move("run", "done", s->bucket, s->id, done, sizeof done);
            snprintf(db, sizeof db, "%s/done/%s", Q, s->bucket);
            want_sync(db);
            s->pid = 0;
            inflight--;
            finished++;
        }
    }
    pthread_mutex_lock(&mu);
    stop = 1;
    pthread_mutex_unlock(&mu);
    pthread_join(th, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &r1);
    getrusage(RUSAGE_CHILDREN, &c1);
#define US(a, b) (((b).tv_sec - (a).tv_sec) * 1e6 + ((b).tv_usec - (a).tv_usec))
    double el = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    double user = US(r0.ru_utime, r1.ru_utime), sys = US(r0.ru_stime, r1.ru_stime);
    double kids = US(c0.ru_utime, c1.ru_utime) + US(c0.ru_stime, c1.ru_stime);
    printf("{\"msg_s\": %.1f, \"seconds\": %.3f, \"done\": %d, \"loop_cpu_us\": %.1f, \"loop_sys_us\": %.1f, "
           "\"workers_cpu_us\": %.1f}\n", n / el, el, finished, (user + sys) / n, sys / n, kids / n);
    return 0;
}
