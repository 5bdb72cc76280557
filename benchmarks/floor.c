/*
 * The floor for many callers on few cores: N independent client/server pairs of processes,
 * each pair echoing 64 bytes through a shared-memory slot, the waiter spinning briefly
 * (at most SPIN_NS, yielding the CPU as it goes) then sleeping on a futex, the other side waking it only when it
 * sleeps.  No Python, no codec, no channel table: what the machine gives two processes that
 * hand a call over and back, with as many of them as bench_load.py runs.
 *
 *     cc -O2 -o floor floor.c && ./floor PAIRS SECONDS   ->  total calls per second
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SPIN_NS 30000   /* the longest spin before sleeping */

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

typedef struct {
    _Alignas(64) uint32_t state;   /* 0 idle, 1 request, 2 response */
    uint32_t sleeping[2];          /* the client (0) or the server (1) sleeps on state */
    char data[64];
    _Alignas(64) uint64_t calls;
} slot;

static void wait_for(slot *s, uint32_t want, int me) {
    uint64_t stop = now_ns() + SPIN_NS;
    for (int i = 1;; i++) {
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == want) return;
        if (i % 16 == 0) {
            if (now_ns() > stop) break;
            sched_yield();   /* a peer on this CPU gets to run */
        }
    }
    for (;;) {
        uint32_t cur = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (cur == want) return;
        __atomic_store_n(&s->sleeping[me], 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&s->state, __ATOMIC_SEQ_CST) == cur)
            syscall(SYS_futex, &s->state, FUTEX_WAIT, cur, NULL, NULL, 0);
        __atomic_store_n(&s->sleeping[me], 0, __ATOMIC_SEQ_CST);
    }
}

static void set(slot *s, uint32_t v, int other) {
    __atomic_store_n(&s->state, v, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->sleeping[other], __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &s->state, FUTEX_WAKE, 1, NULL, NULL, 0);
}

int main(int argc, char **argv) {
    int pairs = argc > 1 ? atoi(argv[1]) : 1;
    double seconds = argc > 2 ? atof(argv[2]) : 2.0;
    slot *slots = mmap(NULL, sizeof(slot) * pairs, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    volatile uint32_t *stop = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (slots == MAP_FAILED || stop == MAP_FAILED) return 1;
    memset(slots, 0, sizeof(slot) * pairs);
    pid_t pids[2 * 512];
    int n = 0;
    for (int p = 0; p < pairs && p < 512; p++) {
        slot *s = &slots[p];
        if ((pids[n++] = fork()) == 0) {   /* server */
            for (;;) {
                wait_for(s, 1, 1);
                set(s, 2, 0);
            }
        }
        if ((pids[n++] = fork()) == 0) {   /* client */
            char msg[64] = {0};
            while (!*stop) {
                memcpy(s->data, msg, 64);
                set(s, 1, 1);
                wait_for(s, 2, 0);
                __atomic_store_n(&s->state, 0, __ATOMIC_SEQ_CST);
                s->calls++;
            }
            _exit(0);
        }
    }
    struct timespec t = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    uint64_t before = 0, after = 0;
    nanosleep(&(struct timespec){0, 200000000}, NULL);   /* warm */
    for (int p = 0; p < pairs; p++) before += __atomic_load_n(&slots[p].calls, __ATOMIC_RELAXED);
    nanosleep(&t, NULL);
    for (int p = 0; p < pairs; p++) after += __atomic_load_n(&slots[p].calls, __ATOMIC_RELAXED);
    *stop = 1;
    for (int i = 0; i < n; i++) kill(pids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(pids[i], NULL, 0);
    printf("%.0f\n", (double)(after - before) / seconds);
    return 0;
}
