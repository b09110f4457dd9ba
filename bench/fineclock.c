/*
 * fineclock: LD_PRELOAD shim for sipp 3.6.x response times.
 *
 * sipp 3.6.1 takes its timestamps with clock_gettime(CLOCK_MONOTONIC_COARSE), which only
 * advances once per kernel tick (4 ms with CONFIG_HZ=250). Loopback SIP exchanges take
 * well under a millisecond, so without help every -trace_rtt sample is 0, 4 or 8 ms.
 * This library replaces clock_gettime() and clock_getres() and swaps each *_COARSE clock
 * id for its precise sibling before calling the C library's own implementation, which
 * still goes through the vDSO (no system call per reading).
 *
 * Build (bench/sipbench.py does this on demand into its work directory):
 *     gcc -O2 -Wall -Wextra -shared -fPIC -o libfineclock.so fineclock.c -ldl
 * Use:
 *     LD_PRELOAD=/path/libfineclock.so sipp ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

typedef int (*clock_fn)(clockid_t, struct timespec *);

static clock_fn libc_gettime;
static clock_fn libc_getres;

static clockid_t precise(clockid_t id)
{
    switch (id) {
    case CLOCK_MONOTONIC_COARSE:
        return CLOCK_MONOTONIC;
    case CLOCK_REALTIME_COARSE:
        return CLOCK_REALTIME;
    default:
        return id;
    }
}

__attribute__((constructor)) static void fineclock_init(void)
{
    libc_gettime = (clock_fn)dlsym(RTLD_NEXT, "clock_gettime");
    libc_getres = (clock_fn)dlsym(RTLD_NEXT, "clock_getres");
}

int clock_gettime(clockid_t id, struct timespec *ts)
{
    if (!libc_gettime) /* called before our constructor ran */
        fineclock_init();
    if (libc_gettime)
        return libc_gettime(precise(id), ts);
    return (int)syscall(SYS_clock_gettime, precise(id), ts);
}

int clock_getres(clockid_t id, struct timespec *res)
{
    if (!libc_getres)
        fineclock_init();
    if (libc_getres)
        return libc_getres(precise(id), res);
    return (int)syscall(SYS_clock_getres, precise(id), res);
}
