/*
 * logflush: a TCG plugin that bounds how long recorded inputs and replay log
 * bytes wait inside the recording QEMU.
 *
 * Part of vmft's output rule: every packet the output gate holds waits for
 * the backup's ACK of the log up to it, and every request the guest serves
 * waits for its disk writes to complete.  Inside a recording QEMU both stall
 * in two places, and this plugin's one thread bounds both, every
 * `interval_us` microseconds:
 *
 * 1. The log sits in QEMU's stdio buffer (4 KiB on a pipe) until it fills:
 *    at an idle guest's ~30 KiB/s that is 100 ms and more.  The thread calls
 *    fflush(NULL), pushing whatever the log holds into the pipe.  glibc locks
 *    each stream, so the flush is safe against the threads writing events,
 *    and fflush(NULL) takes the list of open streams under glibc's lock, so a
 *    log closed at exit is never touched.
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
 *    it not idle, so the thread also makes QEMU queue a no-op work item on
 *    every vCPU: it toggles the registration of a syscall callback.  Syscall
 *    callbacks exist only in user-mode emulation, so this callback never
 *    runs; but each change of a plugin event mask makes QEMU's plugin core
 *    queue a mask update on every vCPU (async_run_on_cpu), and the vCPU loop
 *    then runs once and delivers what is queued.  This is the same wake-up
 *    QEMU itself uses for a halted vCPU when a virtual timer is re-armed
 *    (qemu_timer_notify_cb), so the recording only gains loop iterations of
 *    the kind it already has many of.  Measured, it cut the wait from 2.2 ms
 *    to 0.6 ms (median) and a counter request by ~10 ms.  The thread kicks,
 *    waits an eighth of the interval and then flushes, so the checkpoint
 *    the kick makes the vCPU log leaves in the same round.
 *
 * 3. The replay must wake the same way.  Each wake-up of an idle recording
 *    logs a checkpoint (CHECKPOINT_CLOCK_WARP_ACCOUNT) that only the
 *    replaying vCPU thread can consume, and nothing in a replaying QEMU
 *    wakes its halted vCPU for it before the main loop's warp timer runs
 *    out, which is up to the guest's next timer: measured, an idle pair
 *    whose recording alone kicked fell behind 8 s in 30 s (throttled at
 *    0.88); with the replay kicking too it stayed 22 ms behind (median).
 *    So the backup's QEMU loads this plugin too.  Waking a replay is
 *    harmless: it consumes only what the log says, when the log says so.
 *
 * The plugin registers no instrumentation: translation and guest execution
 * are unchanged, and every input stays in the log at the instruction it was
 * delivered at.
 *
 * Usage: -plugin liblogflush.so,interval_us=2000[,kick=on|off]
 */

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static atomic_bool stopping;
static pthread_t flusher;
static struct timespec interval, before_kick, settle;
static qemu_plugin_id_t self;
static bool kick = true; /* 2. and 3. above */

/* Never called in system emulation: registering it only changes the event mask. */
static void no_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num,
                       uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                       uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    (void)id, (void)vcpu_index, (void)num, (void)a1, (void)a2, (void)a3;
    (void)a4, (void)a5, (void)a6, (void)a7, (void)a8;
}

static void sleep_for(struct timespec span)
{
    while (nanosleep(&span, &span) == -1 && errno == EINTR) {
        continue;
    }
}

static void *flush_forever(void *unused)
{
    (void)unused;
    bool registered = false;
    while (!atomic_load(&stopping)) {
        if (kick) {
            /* Wake the vCPU, then give it `settle` to log what it delivers
             * (a checkpoint, the queued inputs), so this round's flush
             * carries them rather than the next one's. */
            sleep_for(before_kick);
            registered = !registered;
            qemu_plugin_register_vcpu_syscall_cb(self, registered ? no_syscall : NULL);
            sleep_for(settle);
        } else {
            sleep_for(interval);
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
}

/* Parses interval_us=N and kick=on|off; returns the interval, or -1 on a bad argument. */
static long parse_args(int argc, char **argv)
{
    long us = 2000;
    for (int i = 0; i < argc; i++) {
        const char *value = strchr(argv[i], '=');
        size_t name_len = value ? (size_t)(value - argv[i]) : strlen(argv[i]);
        if (value && name_len == strlen("interval_us") &&
            strncmp(argv[i], "interval_us", name_len) == 0) {
            char *end;
            us = strtol(value + 1, &end, 10);
            if (*end != '\0' || us < 100 || us > 1000000) {
                fprintf(stderr, "logflush: interval_us must be 100 .. 1000000, not '%s'\n",
                        value + 1);
                return -1;
            }
        } else if (value && name_len == strlen("kick") && strncmp(argv[i], "kick", name_len) == 0
                   && (strcmp(value + 1, "on") == 0 || strcmp(value + 1, "off") == 0)) {
            kick = strcmp(value + 1, "on") == 0;
        } else {
            fprintf(stderr, "logflush: unknown argument '%s' "
                    "(known: interval_us=N, kick=on|off)\n", argv[i]);
            return -1;
        }
    }
    return us;
}

static struct timespec span_us(long us)
{
    return (struct timespec){.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    long us = parse_args(argc, argv);
    if (us < 0) {
        return -1;
    }
    if (info->system_emulation == false) {
        fprintf(stderr, "logflush: only for system emulation (record/replay)\n");
        return -1;
    }
    self = id;
    interval = span_us(us);
    settle = span_us(us / 8);
    before_kick = span_us(us - us / 8);
    if (pthread_create(&flusher, NULL, flush_forever, NULL) != 0) {
        fprintf(stderr, "logflush: cannot start the flush thread\n");
        return -1;
    }
    qemu_plugin_register_atexit_cb(id, stop_flusher, NULL);
    return 0;
}
