/*
 * The hot path of speedysvc's calls, in C: the shared-memory protocol's
 * atomics and futex wait/wake, the four operations every call goes through
 * (post, wait_reply, next_call, reply), and the common case of the layers just
 * above them.  Everything else (segment creation, growth, reclaiming, errors)
 * lives in speedysvc/shm/.  One extension, speedysvc._shmcore, built from:
 *
 *   layout.h      every shared-memory offset, state, code and frame constant (exported to Python)
 *   names.h       every Python attribute, method and key C uses by name (exported to Python)
 *   core.h        what the units share (this file)
 *   region.c      the Region type, its generic atomics, the adaptive spin, the caller's side
 *                 of a call (post, collect, call, wait_reply)
 *   serve.c       the worker's side (claim, reply, run_method, serve)
 *   channel.c     taking a transport's channel, giving it back, aborting a call on it
 *   shm_method.c  ShmMethod: a client's generated method, the common case in C
 *   gateway.c     Gateway: the TCP gateway's usual call; LocalWay: a TCP-serving worker's;
 *                 ServerConnectionCore: a served connection's read callbacks
 *   call_alone.c  call_alone: the TCP client's call alone on its connection; TcpMethod: its
 *                 generated method, the usual call in C; the call ids and the fork generation
 *   msgpack.c     msgpack for the usual values
 *   boundary.c    the objects of names.h; reading attributes and calling hooks on Python objects
 *   module.c      the module's functions (the worker's watchdog of its owner among them), its
 *                 init, the constants' export
 *
 * Linux only: futex(2) on a word of a MAP_SHARED mapping (no FUTEX_PRIVATE,
 * since the waiters are different processes).
 *
 * What the GIL protects.  These units take no lock of their own: what they
 * share with Python's threads stays consistent because the GIL is held from
 * one Python call to the next.  A build for free-threaded Python must give
 * each of these a lock (or a critical section) first:
 *   - an attachment's free-channel list (Channels.free): channel.c looks at it
 *     and pops from it, and reads `closed` and appends to it, with no Python
 *     code in between, where ShmTransport._give_back needs a second look;
 *   - the transport's attachment (ShmTransport._channels, and Channels.region
 *     and .free read from it): read once per call and held (a reference) for
 *     the call, while another thread may drop or replace it;
 *   - the gateway's counters dict: count() reads, adds and stores;
 *   - the connection's fields that call_alone uses (ConnectionCore's, the
 *     base of BlockingConnection): broken, reading, retired, waiting and the
 *     parser's state under the connection's `lock`, as BlockingConnection
 *     does (that lock goes on protecting them), but last_read stored and
 *     sock read without it, as Python does, each a whole value only because
 *     of the GIL; and ServerConnectionCore's (parser, transport, short_way,
 *     closed, inflight, share), which only the event loop's thread uses;
 *   - borrowed references (PyList_GET_ITEM, PyDict_GetItemWithError) to items
 *     of containers other threads may change: used before any Python code
 *     runs, or a reference is taken first (serve's channels and handlers);
 *   - the module-level state: the msgpack fallbacks (set_msgpack swaps them;
 *     a call takes a reference first), and the names and objects made once at
 *     import.  The spin budgets and the load sample (region.c) are hints,
 *     read and written with or without the GIL: a stale value costs a spin or
 *     a sleep, never a wrong answer.
 */
#ifndef SPEEDYSVC_CORE_H
#define SPEEDYSVC_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "layout.h"
#include "names.h"

/* What one unit defines for another stays inside the extension, and calls
 * between units are direct (not through the PLT). */
#pragma GCC visibility push(hidden)

/* ---- atomics on shared memory ------------------------------------------ */
#define U32(base, off) ((uint32_t *)((char *)(base) + (off)))
#define U64(base, off) ((uint64_t *)((char *)(base) + (off)))
#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define CAS(p, e, n) __atomic_compare_exchange_n((p), (e), (n), 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- futex ---------------------------------------------------------------- */
static inline int futex_wait(uint32_t *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull)};
    if (syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0) == 0) return 0;
    return errno; /* EAGAIN (value changed), ETIMEDOUT, EINTR */
}

static inline int futex_wake(uint32_t *addr, int n) {
    return (int)syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* ---- bounded, adaptive spinning ---------------------------------------
 * A wake-up across cores costs tens of microseconds on a VM; a short spin
 * before sleeping avoids it when the answer is about to arrive.  The spin is
 * bounded by a budget that adapts: a wait that ended in sleep shortly after
 * the budget ran out grows it back to the maximum (a longer spin would have
 * paid), a long wait halves it (spinning did not pay).  When more threads are
 * runnable than there are CPUs, a plain spin would steal the CPU the peer
 * needs, and not spinning makes every call pay a futex wake-up: the spin
 * yields the CPU on every round instead (benchmarks/bench_load.py).  The
 * caller's side spins in region.c, the worker's in serve.c; the budgets are
 * set by module.c's set_spin. */
/* After this long, the spin yields the CPU on every round: if the peer shares
 * our CPU it runs at once.  Not sooner: a call takes a few microseconds, and a
 * sched_yield is a system call that, on a VM, costs about as much as the
 * answer it delays (a 2 us threshold made the median 64-byte call ~20 % slower
 * and its p99 several times worse). */
#define YIELD_AFTER_NS 20000

typedef struct { uint64_t budget_ns; } spinner;
/* defined in region.c */
extern spinner client_spin, worker_spin;
extern uint64_t spin_max_ns;
extern long ncpu;

int system_overloaded(uint64_t now);

/* ``floor_ns``: the budget never falls below it (a worker's: see serve.c, claim_next). */
static inline void spin_adapt(spinner *s, int spun_ok, uint64_t waited_ns, uint64_t floor_ns) {
    if (spun_ok) return;
    if (waited_ns < spin_max_ns) s->budget_ns = spin_max_ns;
    else s->budget_ns = s->budget_ns > 1000 ? s->budget_ns / 2 : 0;
    if (floor_ns > spin_max_ns) floor_ns = spin_max_ns;
    if (s->budget_ns < floor_ns) s->budget_ns = floor_ns;
}

/* Wakes one sleeping worker, if any sleeps.  Without sleepers nothing is
 * written: a worker about to sleep counts itself in H_SLEEPERS before its last
 * look at the bitmap, so it either sees our bit or we see it (seq_cst order). */
static inline int kick_workers(char *base) {
    if (LOAD(U32(base, H_SLEEPERS)) > 0) {
        /* a worker that spins until later than now takes the call: no wake-up (a sleeper woken
         * for nothing costs a system call here and a context switch there, which with more
         * runnable processes than CPUs is most of a call).  The clock is read after the bit
         * was set, so a spinner that stops at its promise reads the bitmap after it (serve.c,
         * claim_spin). */
        uint64_t until = LOAD(U64(base, H_SPIN_UNTIL));
        if (until && now_ns() < until) return 0;
        __atomic_fetch_add(U32(base, H_SEQ), 1, __ATOMIC_SEQ_CST);
        return futex_wake(U32(base, H_SEQ), 1) > 0;
    }
    return 0;
}

/* Is this the only thread of the interpreter?  Then holding the GIL while
 * spinning (a few tens of microseconds at most) keeps nobody waiting. */
static inline int only_thread(void) {
    PyThreadState *ts = PyThreadState_Get();
    return PyInterpreterState_ThreadHead(PyThreadState_GetInterpreter(ts)) == ts && !PyThreadState_Next(ts);
}

/* ---- Region: a writable buffer (an mmap) held for the object's lifetime */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;
    Py_ssize_t size;
    uint32_t last_slot; /* where a worker resumes scanning, for fairness */
    int last_caller_cpu; /* CPU of the caller last served by this worker */
    int owns;           /* a mapping made by map_fd, unmapped on dealloc */
    Py_ssize_t exports; /* memoryviews currently over an owned mapping */
    uint32_t gen;       /* a channel's data segment: its generation (DataSegment sets it), else
                         * GEN_UNKNOWN; a caller reads a response in place only from the
                         * generation the channel is at (see collect_channel) */
} Region;
#define GEN_UNKNOWN 0xFFFFFFFFu

extern PyTypeObject RegionType;

/* A wait's timeout must be a finite number of seconds, at most a day (a NaN
 * would turn into an endless wait and skip the caller's liveness checks). */
static inline int check_timeout(double timeout) {
    if (!(timeout >= 0.0 && timeout <= 86400.0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number of seconds from 0 to 86400");
        return -1;
    }
    return 0;
}

static inline int get_data(PyObject *obj, PyTypeObject *type, Region **out) {
    if (!PyObject_TypeCheck(obj, type)) { PyErr_SetString(PyExc_TypeError, "data must be a Region"); return -1; }
    *out = (Region *)obj;
    return 0;
}

/* region.c: checks, and the caller's side of a call */
int check_service(Region *self);
int check_slot(Region *self, long slot);
int post_call(char *base, long slot, Region *data, Py_buffer *name, Py_buffer *payload, uint32_t flags);
int post_check(char *base, Region *data, Py_ssize_t name_len, Py_ssize_t payload_len);
int post_publish(char *base, long slot, Py_ssize_t name_len, Py_ssize_t total, uint32_t flags);
PyObject *collect_channel(Region *self, long slot, Region *data, double timeout, int woke_worker);
PyObject *call_channel(Region *self, long slot, Region *data, PyObject *name_obj, PyObject *payload_obj,
                       uint32_t flags, double timeout);

/* serve.c: the worker's side, Region methods */
PyObject *R_reply(Region *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *R_serve(Region *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *R_end_phase(Region *self, PyObject *arg);
int tcp_phase_begin(char *base, long widx, long method);
void tcp_phase_end(char *base, long widx, long method, uint32_t status);
PyObject *run_method(PyObject *handler, PyObject *fast, uint32_t flags, PyObject *request, Region *data,
                     PyObject *view);
PyObject *R_tcp_begin(Region *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *R_tcp_end(Region *self, PyObject *const *args, Py_ssize_t nargs);
int serve_init(void);

/* channel.c: a transport's channel for one call made in C */
typedef struct {
    PyObject *chans;   /* transport._channels, the attachment */
    PyObject *free;    /* chans.free */
    PyObject *ch;      /* the channel, ours from channel_take until given back or aborted */
    PyObject *svc;     /* chans.region: the service segment (a Region) */
    PyObject *data;    /* ch.region: the channel's data segment (a Region) */
    long slot;         /* ch.slot */
} taken_channel;
#define TAKEN_CHANNEL_INIT {NULL, NULL, NULL, NULL, NULL, -1}
int channel_take(PyObject *transport, taken_channel *c);
int channel_give_back(PyObject *transport, taken_channel *c);
void channel_abort(PyObject *transport, taken_channel *c);
void channel_release(taken_channel *c);

/* shm_method.c, gateway.c, call_alone.c */
extern PyTypeObject ShmMethodType, GatewayType, LocalWayType, TcpMethodType, ConnectionCoreType, ServerConnectionCoreType;
PyObject *encode_tuple(PyObject *dumps, PyObject *tuple, Py_ssize_t size);

/* call_alone.c, msgpack.c: module functions */
PyObject *m_call_alone(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *m_call_usual(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *m_next_call_id(PyObject *mod, PyObject *unused);
PyObject *m_fork_generation(PyObject *mod, PyObject *unused);
int call_alone_init(void);
PyObject *m_msgpack_dumps(PyObject *mod, PyObject *o);
/* encoded msgpack values this large that C does not take are not handed to unpackb: the codec
 * (codecs/msgpack.py, which reads _shmcore.MSGPACK_LARGE_FALLBACK) reads them in slices */
#define MP_LARGE_FALLBACK (1 << 20)
PyObject *m_msgpack_loads(PyObject *mod, PyObject *data);
PyObject *m_set_msgpack(PyObject *mod, PyObject *args);
Py_ssize_t mp_encoded_size(PyObject *o);
void mp_encode(PyObject *o, char *p);
int is_c_msgpack_dumps(PyObject *f);


/* boundary.c: the Python side as C sees it */
#define DECLARE_NAME(owner, var, text) extern PyObject *var;
PYTHON_NAMES(DECLARE_NAME)
#undef DECLARE_NAME
int names_init(void);
PyObject *names_table(void);
long long int_attr(PyObject *obj, PyObject *name);
int size_attr(PyObject *obj, PyObject *name, uint64_t *out);
void call_keeping_error(PyObject *obj, PyObject *name, PyObject *a, PyObject *b);

#pragma GCC visibility pop

#endif
