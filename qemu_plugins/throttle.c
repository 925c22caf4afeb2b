/*
 * throttle: a TCG plugin that lets the primary's controller slow the guest's
 * vCPU down while the backup lags (the paper's section 3.2: a slow backup
 * slows the primary down, so failover stays short).
 *
 * Counting.  Every translation block gets an inline op adding its
 * instruction count to a per-vCPU scoreboard entry, and a conditional
 * callback that runs only once that entry reaches `quantum` instructions
 * (default 2^17, a millisecond or so of guest execution).  So the cost per
 * executed block is one add and one compare in generated code; C runs once
 * per quantum.
 *
 * Throttling.  The callback reads the share of time the vCPU should sleep
 * (`share_ppm`, parts per million), takes the time the vCPU thread has
 * been busy since the previous quantum and sleeps ran * share / (1 - share),
 * at most `max_sleep_us` at once.  So the vCPU executes for 1 - share of the
 * time it is busy, in slices of a few ms.  Busy is the kernel's account of
 * the thread (/proc/thread-self/schedstat): time on a CPU plus time waiting
 * in the run queue for one, so not the time it slept with the guest halted.
 * Not wall time: under icount (single-threaded round-robin TCG) QEMU never
 * calls a plugin's vCPU idle and resume callbacks, so a wall clock
 * restarted on resume ran on through every idle spell, and the first
 * quantum after one slept for it too (up to max_sleep_us), just when the
 * guest had work again.  Not CPU time alone either: a vCPU that waits for a
 * CPU is busy, and without that wait the loop needed a higher share for the
 * same slow backup and kept the lag less steady (tests/test_lag_control.py's
 * starved backup: p90 103 ms against a 100 ms target).  That thread runs
 * every vCPU in turn; vmft's guests have one.
 * The sleep happens in the vCPU thread between two blocks, holding QEMU's
 * replay lock, as a SIGSTOP of the whole process did before; short slices
 * bound how long the main loop waits for it.
 *
 * Talking to the controller: a 24-byte file in the run directory that the
 * controller creates before starting QEMU and both sides mmap
 * (`vmft_qemu/lag_control.py`, `Throttle`).  The controller stores
 * `share_ppm`; the plugin adds to `slept_ns`.  Aligned 32- and 64-bit
 * words, read and written atomically: no syscall, no thread, no
 * protocol in the hot path, and a value the controller sets holds until it
 * sets another (a socket would need a reader thread in QEMU and a framing).
 *
 * Determinism.  The plugin writes nothing into the guest: it only delays
 * the vCPU thread.  Every clock the guest reads under record is in the
 * replay log, so the recording replays exactly, and the backup's QEMU
 * needs no plugin to replay it (tests/test_lag_control.py checks this).
 *
 * Usage: -plugin libthrottle.so,control=PATH[,quantum=N][,max_sleep_us=N]
 */

#include <errno.h>
#include <fcntl.h>
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

/* The shared control file; the layout is lag_control.Throttle's too. */
struct control {
    uint32_t magic;
    uint32_t version;
    uint32_t share_ppm; /* controller: share of busy time to sleep */
    uint32_t reserved;
    uint64_t slept_ns;  /* plugin: total time the vCPUs slept */
};

/* Per vCPU. */
struct vcpu {
    uint64_t insns;    /* executed since the last quantum ended */
    int64_t since_ns;  /* the vCPU thread's busy time when the last quantum ended */
    int schedstat;     /* the vCPU thread's /proc/thread-self/schedstat */
};

static struct control *control;
static struct qemu_plugin_scoreboard *vcpus;
static uint64_t quantum = 1u << 17;
static int64_t max_sleep_ns = 20 * 1000 * 1000;

/* The vCPU thread's busy time so far: run time plus run-queue wait, in ns
 * (schedstat's first two numbers); `v->since_ns` if it cannot be read. */
static int64_t busy_ns(const struct vcpu *v)
{
    char text[80];
    unsigned long long ran, waited;
    ssize_t n = pread(v->schedstat, text, sizeof(text) - 1, 0);
    if (n <= 0) {
        return v->since_ns;
    }
    text[n] = '\0';
    if (sscanf(text, "%llu %llu", &ran, &waited) != 2) {
        return v->since_ns;
    }
    return (int64_t)(ran + waited);
}

static void sleep_ns(int64_t ns)
{
    struct timespec left = {ns / 1000000000, ns % 1000000000};
    while (nanosleep(&left, &left) == -1 && errno == EINTR) {
        continue;
    }
}

static void start_clock(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    struct vcpu *v = qemu_plugin_scoreboard_find(vcpus, vcpu_index);
    v->schedstat = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC); /* on its thread */
    if (v->schedstat < 0) {
        fprintf(stderr, "throttle: cannot read /proc/thread-self/schedstat (%s): vCPU %u "
                "is not throttled\n", strerror(errno), vcpu_index);
    }
    v->since_ns = busy_ns(v);
}

static void quantum_done(unsigned int vcpu_index, void *unused)
{
    (void)unused;
    struct vcpu *v = qemu_plugin_scoreboard_find(vcpus, vcpu_index);
    v->insns = 0;
    uint64_t share = __atomic_load_n(&control->share_ppm, __ATOMIC_RELAXED);
    int64_t now = busy_ns(v); /* the sleep below is not busy */
    if (share > 0) {
        if (share > MAX_SHARE_PPM) {
            share = MAX_SHARE_PPM;
        }
        int64_t sleep = (now - v->since_ns) * (int64_t)share / (int64_t)(1000000 - share);
        if (sleep > max_sleep_ns) {
            sleep = max_sleep_ns;
        }
        sleep_ns(sleep);
        __atomic_fetch_add(&control->slept_ns, (uint64_t)sleep, __ATOMIC_RELAXED);
    }
    v->since_ns = now;
}

static void instrument(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_u64 count = qemu_plugin_scoreboard_u64_in_struct(vcpus, struct vcpu, insns);
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, QEMU_PLUGIN_INLINE_ADD_U64, count,
                                                      qemu_plugin_tb_n_insns(tb));
    qemu_plugin_register_vcpu_tb_exec_cond_cb(tb, quantum_done, QEMU_PLUGIN_CB_NO_REGS,
                                              QEMU_PLUGIN_COND_GE, count, quantum, NULL);
}

static void finish(qemu_plugin_id_t id, void *unused)
{
    (void)id;
    (void)unused;
    for (int i = 0; i < qemu_plugin_num_vcpus(); i++) {
        close(((struct vcpu *)qemu_plugin_scoreboard_find(vcpus, i))->schedstat);
    }
    munmap(control, sizeof(*control));
    qemu_plugin_scoreboard_free(vcpus);
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
        } else if (value && key == 7 && strncmp(argv[i], "quantum", key) == 0) {
            if (!parse_number(argv[i], value + 1, 1000, 100000000, &n)) {
                return -1;
            }
            quantum = (uint64_t)n;
        } else if (value && key == 12 && strncmp(argv[i], "max_sleep_us", key) == 0) {
            if (!parse_number(argv[i], value + 1, 100, 1000000, &n)) {
                return -1;
            }
            max_sleep_ns = n * 1000;
        } else {
            fprintf(stderr, "throttle: unknown argument '%s' (known: control=PATH, "
                    "quantum=N, max_sleep_us=N)\n", argv[i]);
            return -1;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "throttle: control=PATH is required\n");
        return -1;
    }
    control = map_control(path);
    if (control == NULL) {
        return -1;
    }
    vcpus = qemu_plugin_scoreboard_new(sizeof(struct vcpu));
    qemu_plugin_register_vcpu_init_cb(id, start_clock);
    qemu_plugin_register_vcpu_tb_trans_cb(id, instrument);
    qemu_plugin_register_atexit_cb(id, finish, NULL);
    return 0;
}
