/*
 * logflush: a TCG plugin that bounds how long recorded inputs and replay log
 * bytes wait inside the recording QEMU.
 *
 * Part of vmft's output rule: every packet the output gate holds waits for
 * the backup's ACK of the log up to it, and every request the guest serves
 * waits for its disk writes to complete.  Inside a recording QEMU both stall
 * in two places, and this plugin's one thread bounds both:
 *
 * 1. The log sits in QEMU's stdio buffer (4 KiB on a pipe) until it fills:
 *    at an idle guest's ~30 KiB/s that is 100 ms and more.  Every
 *    `interval_us` the thread calls fflush(NULL), pushing whatever the log
 *    holds into the pipe.  glibc locks each stream, so the flush is safe
 *    against the threads writing events, and fflush(NULL) takes the list of
 *    open streams under glibc's lock, so a log closed at exit is never touched.
 *
 * 2. Under record, QEMU queues each disk completion (blkreplay) and each
 *    inbound packet (filter-replay) as an "async event"; only the vCPU
 *    thread's loop logs and delivers them, at its top
 *    (icount_account_warp_timer -> replay_async_events).  replay_add_event
 *    kicks the vCPU, but a halted vCPU goes straight back to sleep
 *    (rr_wait_io_event waits while all_cpu_threads_idle()), so the event
 *    waits for the guest's next timer interrupt: measured, a durable counter
 *    write (five fsyncs' worth of sequential disk round trips) took 15-25 ms
 *    longer recorded than under plain icount.  Queued work on the vCPU makes
 *    it not idle, so the thread wakes the vCPU by making QEMU queue a no-op
 *    work item on it: it toggles the registration of a syscall callback.
 *    Syscall callbacks exist only in user-mode emulation, so this callback
 *    never runs; but each change of a plugin event mask makes QEMU's plugin
 *    core queue a mask update on every vCPU (async_run_on_cpu), and the vCPU
 *    loop then runs once and delivers what is queued.  This is the same
 *    wake-up QEMU itself uses for a halted vCPU when a virtual timer is
 *    re-armed (qemu_timer_notify_cb).
 *
 *    kick=inputs (the recording): the thread looks every `poll_us` (100)
 *    whether QEMU has inputs queued and wakes the vCPU only then.  QEMU's
 *    binary exports replay_has_events(), which only tests the queue's head
 *    pointer; it is not part of the plugin API, so the plugin looks it up
 *    at load and refuses kick=inputs without it.  The test reads that
 *    pointer without QEMU's replay mutex: at worst a wake-up comes one poll
 *    late or is one too many, and a wake-up changes no guest state.  After
 *    50 ms without inputs the thread looks only every 2 ms, or every
 *    `interval_us` if that is shorter (an idle guest's first input then
 *    waits up to that long): polling at 100 us costs a tenth of a core.
 *    Measured against waking every 2 ms on a clock, in alternating runs of
 *    bench/latency.py, the FT pair served 19.1 instead of 16.6 counter
 *    requests/s at a p50 of 47.5 instead of 56.8 ms (medians of 3 runs),
 *    and an idle recording logs 24 instead of 54 KiB/s: a wake-up with
 *    nothing to deliver still logs a checkpoint.  Waking more often on a
 *    clock is no substitute: at 500 and 250 us the pair got slower (the
 *    log's extra checkpoints and flushes cost the replay and both
 *    controllers CPU).
 *
 *    Only a halted vCPU needs this wake-up: a running one is stopped by
 *    replay_add_event's own kick (cpu_exit) and delivers the input at the top
 *    of its loop.  And every poll preempts the vCPU when both share a core.
 *    So while the vCPU runs the thread looks only every 500 us
 *    (RUNNING_POLL_US), asking QEMU's all_cpu_threads_idle() (exported too,
 *    read the same way) which case it is.  An input that comes just after
 *    the vCPU halts may wait that long.  Measured on one recording QEMU
 *    pinned to a core, under the counter load, 3 alternating pairs: the
 *    thread's CPU fell from 0.11 to 0.04 of a core, the vCPU thread was
 *    preempted 6300-7500 instead of 10500-11400 times a second, and each
 *    request cost QEMU 28-35 instead of 33-40 ms of CPU, p50 28-32 instead
 *    of 33-35 ms.  At 1000 and 2000 us the p50 got worse again.
 *
 * 3. kick=halted (the replay) wakes the vCPU when it has halted.  Each
 *    wake-up of a recording logs a checkpoint (CHECKPOINT_CLOCK_WARP_ACCOUNT)
 *    that only the replaying vCPU thread can consume, and nothing in a
 *    replaying QEMU wakes its halted vCPU for it before the main loop's warp
 *    timer runs out, which is up to the guest's next timer: measured, an idle
 *    pair whose recording alone kicked fell behind 8 s in 30 s.  So the
 *    backup's QEMU loads this plugin too.  Waking a replay is harmless: it
 *    consumes only what the log says, when the log says so.  A running
 *    replay's vCPU takes those checkpoints at the top of its own loop, so the
 *    thread wakes it only when all_cpu_threads_idle() says it has halted
 *    (read as for kick=inputs): it looks every `poll_us` (100) after finding
 *    it halted, every 500 us (RUNNING_POLL_US) after finding it running.
 *    It ignores `interval_us` and flushes nothing (a replay writes no log).
 *    The replay used to be woken on a clock, every 500 us, running or not.
 *    Each such wake-up stops the translated code (and a plugin's mask update
 *    clears the vCPU's jump cache), and a halted vCPU waited 250 us on
 *    average for it: a backlog of 300 counter requests halts the replay's
 *    vCPU about 16 k times (at 5 ms the same backlog took 59 instead of
 *    23 s to replay).  Measured in alternating runs, each QEMU pinned to a
 *    core of its own: under the counter load lag control made the primary's
 *    vCPU sleep 7.5-9.8 % of the load instead of 16-18 % (3 pairs), and a
 *    backlog of 300 requests, the backup's QEMU stopped while they ran,
 *    replayed in 18.9 and 20.1 s against 19.7-24.7 s (4 runs), within the
 *    machine's noise.
 *
 * 4. Flush on request (`flush_socket=PATH`, the recording of an FT pair).
 *    The output gate stamps each frame the guest sends with a log position
 *    at or after the instruction that sent it.  Under record the frame
 *    leaves QEMU only after that position is in the log: the guest's
 *    notify queues virtio-net's transmit bottom half as an async event, and
 *    the vCPU thread writes the event into the log (after the instructions
 *    before it) and only then runs the bottom half, which sends the frame.
 *    So once a frame has reached the controller, a flush puts the log it
 *    needs into the pipe.  The thread binds a unix datagram socket at PATH;
 *    for each datagram it flushes and then sends the datagram back, and the
 *    controller stamps the frames that came before its request with the
 *    icount of the last such event in the log it then reads from the pipe
 *    (vmft_qemu/log_flush.py).  The gate releases a frame against the safe
 *    point the vCPU thread writes right after the sending event, but about
 *    half the time that thread is preempted in between (it has just woken
 *    QEMU's main loop), so the thread flushes again `FOLLOW_UP_NS` after a
 *    request, and twice more at doubling gaps (0.3, 0.9, 2.1 ms).  This
 *    replaces a QMP `query-replay` per batch of frames (0.6-1.5 ms) and the
 *    wait for later log that its later icount needed.  Measured in
 *    alternating runs of an FT pair under a counter load, the gate held a
 *    reply (median) 2.5-3.1 ms with query-replay, 1.5-1.7 ms with the flush
 *    on request, 0.9-1.2 ms with its follow-ups.
 *
 * The plugin registers no instrumentation: translation and guest execution
 * are unchanged, and every input stays in the log at the instruction it was
 * delivered at.
 *
 * Usage: -plugin liblogflush.so,interval_us=2000[,kick=inputs|halted|off][,poll_us=100]
 *                [,flush_socket=PATH]
 */

#define _GNU_SOURCE /* ppoll */
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define BUSY_NS 50000000L /* kick=inputs polls fast this long after an input */
#define IDLE_POLL_US 2000L /* kick=inputs polls at most this slowly */
#define RUNNING_POLL_US 500L /* kick=inputs|halted poll this slowly while the vCPU runs */
#define FOLLOW_UP_NS 300000L /* 4. above: flush again this long after a request, */
#define FOLLOW_UPS 3          /* and this many times, each gap twice the one before */

static atomic_bool stopping;
static pthread_t flusher;
static struct timespec interval, poll_span, idle_span, running_span;
static long interval_ns;
static qemu_plugin_id_t self;
static enum { KICK_OFF, KICK_INPUTS, KICK_HALTED } kick = KICK_OFF;
static bool (*inputs_queued)(void); /* QEMU's replay_has_events() */
static bool (*vcpu_halted)(void); /* QEMU's all_cpu_threads_idle() */
static int requests = -1; /* 4. above: the flush_socket, or -1 */
static struct sockaddr_un requests_at;
static long follow_up_at; /* when to flush again after a request; 0: not pending */
static long follow_up_gap;
static int follow_ups; /* still to come */

/* Never called in system emulation: registering it only changes the event mask. */
static void no_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num,
                       uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                       uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    (void)id, (void)vcpu_index, (void)num, (void)a1, (void)a2, (void)a3;
    (void)a4, (void)a5, (void)a6, (void)a7, (void)a8;
}

/* 2. above: QEMU queues a no-op work item on every vCPU. */
static void wake_vcpu(void)
{
    static bool registered;
    registered = !registered;
    qemu_plugin_register_vcpu_syscall_cb(self, registered ? no_syscall : NULL);
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* 4. above: each request gets a flush that began after it came, then its answer. */
static void serve_requests(void)
{
    char request[64];
    struct sockaddr_un from;
    socklen_t from_len = sizeof(from);
    ssize_t n;
    while ((n = recvfrom(requests, request, sizeof(request), MSG_DONTWAIT,
                         (struct sockaddr *)&from, &from_len)) >= 0) {
        fflush(NULL);
        /* A controller gone or not listening asks again; nothing to do. */
        (void)sendto(requests, request, n, MSG_DONTWAIT, (struct sockaddr *)&from, from_len);
        from_len = sizeof(from);
        follow_ups = FOLLOW_UPS;
        follow_up_gap = FOLLOW_UP_NS;
        follow_up_at = now_ns() + follow_up_gap;
    }
}

/* Sleeps `span`, serving flush requests and their follow-ups as they come. */
static void wait_for(struct timespec span)
{
    long until = now_ns() + span.tv_sec * 1000000000L + span.tv_nsec;
    for (long now = now_ns(); now < until && !atomic_load(&stopping); now = now_ns()) {
        if (follow_up_at && now >= follow_up_at) {
            fflush(NULL);
            follow_up_gap *= 2;
            follow_up_at = --follow_ups > 0 ? now + follow_up_gap : 0;
            continue;
        }
        long left = (follow_up_at && follow_up_at < until ? follow_up_at : until) - now;
        struct timespec timeout = {.tv_sec = left / 1000000000L, .tv_nsec = left % 1000000000L};
        struct pollfd request = {.fd = requests, .events = POLLIN}; /* fd -1: ignored */
        if (ppoll(&request, 1, &timeout, NULL) > 0) {
            serve_requests();
        }
    }
}

/* kick=inputs: wake the vCPU whenever inputs are queued, until a flush is due. */
static void wake_on_inputs_until(long flush_at)
{
    static long last_input;
    while (!atomic_load(&stopping)) {
        long now = now_ns();
        if (now >= flush_at) {
            return;
        }
        wait_for(now - last_input >= BUSY_NS ? idle_span
                 : vcpu_halted() ? poll_span : running_span);
        if (inputs_queued()) {
            wake_vcpu();
            last_input = now_ns();
        }
    }
}

/* kick=halted (the replay): wake the vCPU whenever it has halted.  A replay
 * writes no log, so this thread never flushes: fflush(NULL) locks every
 * stream, the replay log too, which a replaying thread holds while it waits in
 * getc() for the next log bytes. */
static void *wake_whenever_halted(void *unused)
{
    (void)unused;
    bool was_halted = false;
    while (!atomic_load(&stopping)) {
        wait_for(was_halted ? poll_span : running_span);
        was_halted = vcpu_halted();
        if (was_halted) {
            wake_vcpu();
        }
    }
    return NULL;
}

static void *flush_forever(void *unused)
{
    (void)unused;
    while (!atomic_load(&stopping)) {
        if (kick == KICK_INPUTS) {
            wake_on_inputs_until(now_ns() + interval_ns);
        } else {
            wait_for(interval);
        }
        fflush(NULL);
    }
    return NULL;
}

static void stop_flusher(qemu_plugin_id_t id, void *unused)
{
    (void)id;
    (void)unused;
    atomic_store(&stopping, true);
    pthread_join(flusher, NULL);
    fflush(NULL);
    if (requests >= 0) {
        close(requests);
        unlink(requests_at.sun_path);
    }
}

/* Binds the flush_socket at `path`; false (and a message) if it cannot. */
static bool open_requests(const char *path)
{
    if (strlen(path) >= sizeof(requests_at.sun_path)) {
        fprintf(stderr, "logflush: flush_socket path too long: %s\n", path);
        return false;
    }
    requests_at.sun_family = AF_UNIX;
    strcpy(requests_at.sun_path, path);
    requests = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (requests < 0) {
        fprintf(stderr, "logflush: cannot make flush_socket: %s\n", strerror(errno));
        return false;
    }
    unlink(path); /* a socket left by a QEMU before this one */
    if (bind(requests, (struct sockaddr *)&requests_at, sizeof(requests_at))) {
        fprintf(stderr, "logflush: cannot bind flush_socket %s: %s\n", path, strerror(errno));
        close(requests);
        requests = -1;
        return false;
    }
    return true;
}

/* A microsecond count in 100 .. 1000000, or -1 (and a message) if `value` is none. */
static long parse_us(const char *name, const char *value)
{
    char *end;
    long us = strtol(value, &end, 10);
    if (*value == '\0' || *end != '\0' || us < 100 || us > 1000000) {
        fprintf(stderr, "logflush: %s must be 100 .. 1000000, not '%s'\n", name, value);
        return -1;
    }
    return us;
}

/* The kick mode called `name`, or -1. */
static int kick_named(const char *name)
{
    static const char *const kicks[] = {[KICK_OFF] = "off", [KICK_INPUTS] = "inputs",
                                        [KICK_HALTED] = "halted"};
    for (size_t k = 0; k < sizeof(kicks) / sizeof(kicks[0]); k++) {
        if (strcmp(name, kicks[k]) == 0) {
            return (int)k;
        }
    }
    return -1;
}

/* The value in `arg` if it reads `name=value`, else NULL. */
static const char *value_of(const char *arg, const char *name)
{
    size_t len = strlen(name);
    return strncmp(arg, name, len) == 0 && arg[len] == '=' ? arg + len + 1 : NULL;
}

/* Parses interval_us=N, poll_us=N, kick=inputs|halted|off and flush_socket=PATH into
 * `us`, `poll_us` and `socket_path`; returns false on a bad argument. */
static bool parse_args(int argc, char **argv, long *us, long *poll_us,
                       const char **socket_path)
{
    for (int i = 0; i < argc; i++) {
        const char *value;
        int named = -1;
        if ((value = value_of(argv[i], "interval_us"))) {
            if ((*us = parse_us("interval_us", value)) < 0) {
                return false;
            }
        } else if ((value = value_of(argv[i], "poll_us"))) {
            if ((*poll_us = parse_us("poll_us", value)) < 0) {
                return false;
            }
        } else if ((value = value_of(argv[i], "kick")) && (named = kick_named(value)) >= 0) {
            kick = named;
        } else if ((value = value_of(argv[i], "flush_socket")) && *value) {
            *socket_path = value;
        } else {
            fprintf(stderr, "logflush: unknown argument '%s' (known: interval_us=N, "
                    "poll_us=N, kick=inputs|halted|off, flush_socket=PATH)\n", argv[i]);
            return false;
        }
    }
    return true;
}

static struct timespec span_us(long us)
{
    return (struct timespec){.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    long us = 2000, poll_us = 100;
    const char *socket_path = NULL;
    if (!parse_args(argc, argv, &us, &poll_us, &socket_path)) {
        return -1;
    }
    if (info->system_emulation == false) {
        fprintf(stderr, "logflush: only for system emulation (record/replay)\n");
        return -1;
    }
    if (kick != KICK_OFF) {
        vcpu_halted = (bool (*)(void))dlsym(RTLD_DEFAULT, "all_cpu_threads_idle");
        inputs_queued = (bool (*)(void))dlsym(RTLD_DEFAULT, "replay_has_events");
        if (vcpu_halted == NULL || (kick == KICK_INPUTS && inputs_queued == NULL)) {
            fprintf(stderr, "logflush: kick=inputs needs replay_has_events() and "
                    "all_cpu_threads_idle(), kick=halted the latter; this QEMU does not "
                    "export them: use kick=off\n");
            return -1;
        }
    }
    if (socket_path && !open_requests(socket_path)) {
        return -1;
    }
    self = id;
    interval_ns = us * 1000;
    interval = span_us(us);
    poll_span = span_us(poll_us);
    idle_span = span_us(us < IDLE_POLL_US ? us : IDLE_POLL_US);
    running_span = span_us(poll_us > RUNNING_POLL_US ? poll_us : RUNNING_POLL_US);
    if (pthread_create(&flusher, NULL, kick == KICK_HALTED ? wake_whenever_halted : flush_forever,
                       NULL) != 0) {
        fprintf(stderr, "logflush: cannot start the flush thread\n");
        return -1;
    }
    qemu_plugin_register_atexit_cb(id, stop_flusher, NULL);
    return 0;
}
