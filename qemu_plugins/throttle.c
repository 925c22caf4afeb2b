/*
 * throttle: a TCG plugin that lets the primary's controller slow the guest's
 * vCPU down while the backup lags (the paper's section 3.2: a slow backup
 * slows the primary down, so failover stays short).
 *
 * Throttling.  A thread of the plugin looks every `period_us` (1000) at the
 * share of time the vCPU should sleep (`share_ppm`, parts per million) and
 * at how long the vCPU thread has been busy since it last slept, and owes
 * it a sleep of busy * share / (1 - share), at most `max_sleep_us` at once.
 * It pays that sleep by holding QEMU's replay mutex for it: the recording's
 * vCPU thread holds that mutex while it executes a slice of guest code
 * (icount_prepare_for_run to icount_process_data), so the thread gets it
 * when the current slice ends, and the vCPU waits for it before its next.
 * So the vCPU executes for 1 - share of the time it is busy, in slices of a
 * few ms.  QEMU's binary exports replay_mutex_lock() and
 * replay_mutex_unlock(); they are not part of the plugin API, so the plugin
 * looks them up at load and refuses to load without them.  QEMU's main loop
 * waits for that mutex too (it writes checkpoints into the log), as it did
 * when a SIGSTOP of the whole process was the throttle.
 *
 * Why a thread and not the vCPU itself: this plugin used to count every
 * translation block's instructions inline and sleep in the vCPU thread once
 * per quantum.  That instrumentation cost the guest even at share 0,
 * measured on a recording with logflush, pinned, under the counter load,
 * 3 alternating pairs: with the plugin loaded each request cost QEMU 1.8-7.3
 * ms more CPU and its p50 rose 3.5-11.6 ms.  The thread leaves translation
 * and guest execution unchanged.
 *
 * Busy is the kernel's account of the vCPU thread
 * (/proc/thread-self/schedstat, opened on that thread when the vCPU starts):
 * time on a CPU plus time waiting in the run queue for one, so not the time
 * it slept with the guest halted, nor the time it waited for the mutex.
 * Not wall time: under icount (single-threaded round-robin TCG) QEMU never
 * calls a plugin's vCPU idle and resume callbacks, so a wall clock
 * restarted on resume ran on through every idle spell, and the first
 * sleep after one was for it too (up to max_sleep_us), just when the guest
 * had work again.  Not CPU time alone either: a vCPU that waits for a
 * CPU is busy, and without that wait the loop needed a higher share for the
 * same slow backup and kept the lag less steady (tests/test_lag_control.py's
 * starved backup: p90 103 ms against a 100 ms target).  That thread runs
 * every vCPU in turn; vmft's guests have one.
 *
 * Talking to the controller: a 24-byte file in the run directory that the
 * controller creates before starting QEMU and both sides mmap
 * (`vmft_qemu/lag_control.py`, `Throttle`).  The controller stores
 * `share_ppm`; the plugin adds to `slept_ns`.  Aligned 32- and 64-bit
 * words, read and written atomically: no syscall and no
 * protocol in the loop, and a value the controller sets holds until it
 * sets another (a socket would need a reader thread in QEMU and a framing).
 *
 * Determinism.  The plugin writes nothing into the guest: it only delays
 * the vCPU thread.  Every clock the guest reads under record is in the
 * replay log, so the recording replays exactly, and the backup's QEMU
 * needs no plugin to replay it (tests/test_lag_control.py checks this).
 *
 * Usage: -plugin libthrottle.so,control=PATH[,period_us=N][,max_sleep_us=N]
 */

#define _GNU_SOURCE /* pthread_timedjoin_np */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define CONTROL_MAGIC 0x54464d56u /* "VMFT" read as little-endian */
#define CONTROL_VERSION 1u
#define MAX_SHARE_PPM 950000u /* never stop the vCPU altogether */
#define MIN_SLEEP_NS 100000L  /* a smaller debt waits for the next look */
#define STOP_WAIT_NS 1000000000L /* at exit, for the thread to end */

/* The shared control file; the layout is lag_control.Throttle's too. */
struct control {
    uint32_t magic;
    uint32_t version;
    uint32_t share_ppm; /* controller: share of busy time to sleep */
    uint32_t reserved;
    uint64_t slept_ns;  /* plugin: total time the vCPUs slept */
};

static struct control *control;
static long period_ns = 1000L * 1000;
static int64_t max_sleep_ns = 20 * 1000 * 1000;
static atomic_int schedstat = -1; /* the vCPU thread's /proc/thread-self/schedstat */
static atomic_bool stopping;
static pthread_t throttler;
static void (*replay_lock)(void);   /* QEMU's replay_mutex_lock() */
static void (*replay_unlock)(void); /* QEMU's replay_mutex_unlock() */

/* The vCPU thread's busy time so far: run time plus run-queue wait, in ns
 * (schedstat's first two numbers); `otherwise` if it cannot be read. */
static int64_t busy_ns(int fd, int64_t otherwise)
{
    char text[80];
    unsigned long long ran, waited;
    ssize_t n = pread(fd, text, sizeof(text) - 1, 0);
    if (n <= 0) {
        return otherwise;
    }
    text[n] = '\0';
    if (sscanf(text, "%llu %llu", &ran, &waited) != 2) {
        return otherwise;
    }
    return (int64_t)(ran + waited);
}

static void sleep_until(const struct timespec *when)
{
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, when, NULL) == EINTR) {
        continue;
    }
}

static struct timespec after_ns(long ns)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += (t.tv_nsec + ns) / 1000000000L;
    t.tv_nsec = (t.tv_nsec + ns) % 1000000000L;
    return t;
}

static void *throttle_forever(void *unused)
{
    (void)unused;
    int64_t since = -1; /* busy time when the vCPU last paid its debt */
    while (!atomic_load(&stopping)) {
        struct timespec next = after_ns(period_ns);
        sleep_until(&next);
        int fd = atomic_load(&schedstat);
        if (fd < 0) {
            continue; /* the vCPU has not started yet */
        }
        int64_t now = busy_ns(fd, since);
        uint64_t share = __atomic_load_n(&control->share_ppm, __ATOMIC_RELAXED);
        if (since < 0 || share == 0) {
            since = now;
            continue;
        }
        if (share > MAX_SHARE_PPM) {
            share = MAX_SHARE_PPM;
        }
        int64_t sleep = (now - since) * (int64_t)share / (int64_t)(1000000 - share);
        if (sleep < MIN_SLEEP_NS) {
            continue;
        }
        if (sleep > max_sleep_ns) {
            sleep = max_sleep_ns;
        }
        replay_lock(); /* once the vCPU's current slice has ended */
        struct timespec until = after_ns(sleep);
        sleep_until(&until);
        replay_unlock();
        __atomic_fetch_add(&control->slept_ns, (uint64_t)sleep, __ATOMIC_RELAXED);
        since = now;
    }
    return NULL;
}

static void start_clock(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    if (vcpu_index != 0) {
        return; /* round-robin TCG runs every vCPU on this same thread */
    }
    int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC); /* on its thread */
    if (fd < 0) {
        fprintf(stderr, "throttle: cannot read /proc/thread-self/schedstat (%s): the vCPU "
                "is not throttled\n", strerror(errno));
        return;
    }
    atomic_store(&schedstat, fd);
}

static void finish(qemu_plugin_id_t id, void *unused)
{
    (void)id;
    (void)unused;
    atomic_store(&stopping, true);
    /* The thread may be waiting for the replay mutex of a QEMU that is
     * going away: wait a bounded time, and leave its memory alone if it
     * does not end (the process is exiting anyway). */
    struct timespec limit;
    clock_gettime(CLOCK_REALTIME, &limit);
    limit.tv_sec += STOP_WAIT_NS / 1000000000L;
    if (pthread_timedjoin_np(throttler, NULL, &limit) == 0) {
        munmap(control, sizeof(*control));
    }
}

static struct control *map_control(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "throttle: cannot open the control file %s: %s (the controller "
                "creates it before it starts QEMU)\n", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    struct control *c = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(*c)) {
        c = mmap(NULL, sizeof(*c), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    close(fd);
    if (c == MAP_FAILED) {
        fprintf(stderr, "throttle: %s is not a control file of %zu bytes\n", path, sizeof(*c));
        return NULL;
    }
    if (c->magic != CONTROL_MAGIC || c->version != CONTROL_VERSION) {
        fprintf(stderr, "throttle: %s: magic %08x version %u, expected %08x version %u\n",
                path, c->magic, c->version, CONTROL_MAGIC, CONTROL_VERSION);
        munmap(c, sizeof(*c));
        return NULL;
    }
    return c;
}

/* Parses one "key=value" number argument into *out; false if out of range. */
static bool parse_number(const char *arg, const char *value, long lo, long hi, long *out)
{
    char *end;
    long n = strtol(value, &end, 10);
    if (*value == '\0' || *end != '\0' || n < lo || n > hi) {
        fprintf(stderr, "throttle: %.*s must be %ld .. %ld, not '%s'\n",
                (int)(value - 1 - arg), arg, lo, hi, value);
        return false;
    }
    *out = n;
    return true;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        const char *value = strchr(argv[i], '=');
        size_t key = value ? (size_t)(value - argv[i]) : strlen(argv[i]);
        long n;
        if (value && key == 7 && strncmp(argv[i], "control", key) == 0) {
            path = value + 1;
        } else if (value && key == 9 && strncmp(argv[i], "period_us", key) == 0) {
            if (!parse_number(argv[i], value + 1, 100, 100000, &n)) {
                return -1;
            }
            period_ns = n * 1000;
        } else if (value && key == 12 && strncmp(argv[i], "max_sleep_us", key) == 0) {
            if (!parse_number(argv[i], value + 1, 100, 1000000, &n)) {
                return -1;
            }
            max_sleep_ns = n * 1000;
        } else {
            fprintf(stderr, "throttle: unknown argument '%s' (known: control=PATH, "
                    "period_us=N, max_sleep_us=N)\n", argv[i]);
            return -1;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "throttle: control=PATH is required\n");
        return -1;
    }
    replay_lock = (void (*)(void))dlsym(RTLD_DEFAULT, "replay_mutex_lock");
    replay_unlock = (void (*)(void))dlsym(RTLD_DEFAULT, "replay_mutex_unlock");
    if (replay_lock == NULL || replay_unlock == NULL) {
        fprintf(stderr, "throttle: this QEMU does not export replay_mutex_lock() and "
                "replay_mutex_unlock(), which the throttle holds the vCPU with\n");
        return -1;
    }
    control = map_control(path);
    if (control == NULL) {
        return -1;
    }
    if (pthread_create(&throttler, NULL, throttle_forever, NULL) != 0) {
        fprintf(stderr, "throttle: cannot start its thread\n");
        munmap(control, sizeof(*control));
        return -1;
    }
    qemu_plugin_register_vcpu_init_cb(id, start_clock);
    qemu_plugin_register_atexit_cb(id, finish, NULL);
    return 0;
}
