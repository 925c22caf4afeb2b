/*
 * logflush: a TCG plugin that bounds how long replay log bytes wait inside
 * the recording QEMU.
 *
 * Part of vmft's output rule.  QEMU writes its replay log through stdio,
 * fully buffered (4 KiB on a pipe), so the newest events can sit in the
 * record process until the buffer fills: at an idle guest's ~30 KiB/s that
 * is 100 ms and more, and every packet the output gate holds waits for the
 * backup's ACK of exactly those events.  This plugin starts one thread that
 * calls fflush(NULL) every `interval_us` microseconds, pushing whatever the
 * log holds into the pipe.  glibc locks each stream, so the flush is safe
 * against the threads writing events, and fflush(NULL) takes the list of
 * open streams under glibc's lock, so a log closed at exit is never touched.
 * It registers no instrumentation: translation and guest execution are
 * unchanged, and a recording made with it replays without it.
 *
 * Usage: -plugin liblogflush.so,interval_us=2000
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
static struct timespec interval;

static void *flush_forever(void *unused)
{
    (void)unused;
    while (!atomic_load(&stopping)) {
        struct timespec left = interval;
        while (nanosleep(&left, &left) == -1 && errno == EINTR) {
            continue;
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

static long parse_interval_us(int argc, char **argv)
{
    long us = 2000;
    for (int i = 0; i < argc; i++) {
        const char *value = strchr(argv[i], '=');
        if (value == NULL || strncmp(argv[i], "interval_us", value - argv[i]) != 0) {
            fprintf(stderr, "logflush: unknown argument '%s' (known: interval_us=N)\n",
                    argv[i]);
            return -1;
        }
        char *end;
        us = strtol(value + 1, &end, 10);
        if (*end != '\0' || us < 100 || us > 1000000) {
            fprintf(stderr, "logflush: interval_us must be 100 .. 1000000, not '%s'\n",
                    value + 1);
            return -1;
        }
    }
    return us;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    long us = parse_interval_us(argc, argv);
    if (us < 0) {
        return -1;
    }
    interval.tv_sec = us / 1000000;
    interval.tv_nsec = (us % 1000000) * 1000;
    if (pthread_create(&flusher, NULL, flush_forever, NULL) != 0) {
        fprintf(stderr, "logflush: cannot start the flush thread\n");
        return -1;
    }
    qemu_plugin_register_atexit_cb(id, stop_flusher, NULL);
    return 0;
}
