/*
 * The hot path of the shared-memory protocol: atomics, futex wait/wake and
 * the four operations every call goes through (post, wait_reply, next_call,
 * reply).  Everything else (segment creation, growth, reclaiming, errors)
 * lives in speedysvc/shm.py.  The layout is documented in docs/shm-protocol.md;
 * its offsets are defined here once and exported to Python as constants.
 *
 * Linux only: futex(2) on a word of a MAP_SHARED mapping (no FUTEX_PRIVATE,
 * since the waiters are different processes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <malloc.h>
#include <poll.h>
#include <sys/socket.h>

/* ---- layout ------------------------------------------------------------ */
#define MAGIC            0x43565353u   /* "SSVC" */
#define LAYOUT_VERSION   2u

#define H_MAGIC          0
#define H_VERSION        4
#define H_MAX_CHANNELS   8
#define H_MAX_WORKERS    12
#define H_MAX_PAYLOAD    16    /* u64 */
#define H_OWNER_PID      24
#define H_STATE          28
#define H_CREATED_NS     32    /* u64, CLOCK_REALTIME */
#define H_OWNER_START    40    /* u64, owner's start time in clock ticks */
#define H_STATS_OFF      48    /* u32, where the per-method statistics start */
#define H_MAX_METHODS    52    /* u32, methods with statistics of their own */
#define H_NAMES_OFF      56    /* u32, where the method names start (MAX_METHODS x 64 bytes) */
#define H_OWNER_FLAGS    60    /* u32: bit 0, the owner restarts workers that die;
                                  bit 1, the first workers have started */
#define OWNER_RESTARTS_WORKERS 1u
#define OWNER_WORKERS_STARTED  2u
#define NAME_SIZE        64
#define H_SEQ            64    /* own cache line: futex word workers sleep on */
#define H_SLEEPERS       68
#define H_BITMAP         256   /* one bit per channel with a posted call */
#define H_WORKERS        4096
#define W_SIZE           64
#define W_PID            0
#define W_STATE          4     /* 0 free, 1 idle, 2 busy */
#define W_CALLS          8
#define W_BUSY_NS        16
#define W_STARTED_NS     24
#define W_ERRORS         32
#define W_CLAIM_NS       40
#define W_START_TICKS    48    /* u64, the worker's start time (clock ticks), against pid reuse */
#define H_CHANNELS       8192
/* A channel takes two cache lines: the first is written by the caller (and
 * holds the state word both sides watch), the second by the worker, so the
 * worker writing its response fields does not fight a caller spinning on the
 * state word. */
#define C_SIZE           128
#define C_STATE          0     /* futex word the caller sleeps on */
#define C_OWNER_PID      4
#define C_DATA_GEN       8
#define C_FLAGS          12
#define C_DATA_CAP       16
#define C_REQ_LEN        24
#define C_NAME_LEN       32
#define C_OWNER_START    40
#define C_CALLER_CPU     48    /* where the caller ran when it posted */
#define C_STATUS         64
#define C_RESP_OFF       72
#define C_RESP_LEN       80
#define C_WORKER_CPU     88    /* where the worker ran when it claimed */

#define MAX_CHANNELS_LIMIT 4096
#define MAX_WORKERS      64
#define MAX_METHODS      64
/* per-method statistics: one record per (worker, method), written by that
 * worker only; a supervisor sums them */
#define M_SIZE           256
#define M_CALLS          0
#define M_ERRORS         8
#define M_TOTAL_NS       16
#define M_MAX_NS         24
#define M_BUCKETS        32    /* u64[28]: bucket b counts calls under 2^b µs; the last, all slower */
#define M_NBUCKETS       28

/* service states */
#define SVC_STARTING 0
#define SVC_SERVING  1
#define SVC_STOPPING 2
#define SVC_STOPPED  3

/* channel state word: low 4 bits a code, bit 4 "caller sleeps on futex",
 * bits 8..31 the pid of the worker that claimed the call (pid_max <= 2^22). */
#define ST_IDLE      0u
#define ST_REQUEST   1u
#define ST_CLAIMED   2u
#define ST_RESPONSE  3u
#define ST_ABANDONED 4u
#define ST_CODE      0x0fu
#define ST_WAITING   0x10u
#define ST_PID_SHIFT 8

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

static int futex_wait(uint32_t *addr, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull)};
    if (syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0) == 0) return 0;
    return errno; /* EAGAIN (value changed), ETIMEDOUT, EINTR */
}

static int futex_wake(uint32_t *addr, int n) {
    return (int)syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* ---- bounded, adaptive spinning ---------------------------------------
 * A wake-up across cores costs tens of microseconds on a VM; a short spin
 * before sleeping avoids it when the answer is about to arrive.  The spin is
 * bounded by a budget that adapts: a wait that ended in sleep shortly after
 * the budget ran out grows it back to the maximum (a longer spin would have
 * paid), a long wait halves it (spinning did not pay).  When more threads are
 * runnable than there are CPUs, spinning would steal the CPU the peer needs,
 * so it is skipped altogether. */
/* After this long, the spin yields the CPU on every round: if the peer shares
 * our CPU it runs at once.  Not sooner: a call takes a few microseconds, and a
 * sched_yield is a system call that, on a VM, costs about as much as the
 * answer it delays (a 2 us threshold made the median 64-byte call ~20 % slower
 * and its p99 several times worse). */
#define YIELD_AFTER_NS 20000

typedef struct { uint64_t budget_ns; } spinner;
static spinner client_spin = {0}, worker_spin = {0};
static uint64_t spin_max_ns = 50000;
static long ncpu = 1;
static uint64_t load_checked_ns = 0;
static int overloaded = 0;

static int system_overloaded(uint64_t now) {
    if (now - load_checked_ns < 20000000ull) return overloaded;
    load_checked_ns = now;
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return overloaded;
    char buf[128];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return overloaded;
    buf[n] = 0;
    /* "0.10 0.20 0.30 R/T last": R = runnable tasks right now, us included */
    char *p = buf;
    for (int field = 0; field < 3 && p; field++) { p = strchr(p, ' '); if (p) p++; }
    /* one sample is a moment's view (a daemon waking up counts): spinning stops
     * only when two samples in a row see more runnable threads than CPUs */
    static int last_over = 0;
    if (p) {
        int over = atol(p) > ncpu;
        overloaded = over && last_over;
        last_over = over;
    }
    return overloaded;
}

static void spin_adapt(spinner *s, int spun_ok, uint64_t waited_ns) {
    if (spun_ok) return;
    if (waited_ns < spin_max_ns) s->budget_ns = spin_max_ns;
    else s->budget_ns = s->budget_ns > 1000 ? s->budget_ns / 2 : 0;
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
} Region;

static int check_timeout(double timeout);

static int check_off(Region *r, Py_ssize_t off, Py_ssize_t width) {
    if (!r->base || off < 0 || off % width != 0 || off + width > r->size) {
        PyErr_Format(PyExc_ValueError, "offset %zd out of range or unaligned", off);
        return -1;
    }
    return 0;
}

static int Region_init(Region *self, PyObject *args, PyObject *kw) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj)) return -1;
    if (self->base || self->owns) {
        PyErr_SetString(PyExc_TypeError, "a Region is initialised once");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    self->base = self->view.buf;
    self->size = self->view.len;
    self->last_caller_cpu = -1;
    if (((uintptr_t)self->base & 63) != 0) {
        PyBuffer_Release(&self->view); self->base = NULL;
        PyErr_SetString(PyExc_ValueError, "region must be 64-byte aligned (use an mmap)");
        return -1;
    }
    return 0;
}

static void Region_dealloc(Region *self) {
    if (self->owns) { if (self->base) munmap(self->base, self->size); }
    else if (self->base) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* -- generic atomics, for the slow paths written in Python -------------- */
static PyObject *R_load32(Region *self, PyObject *arg) {
    Py_ssize_t off = PyLong_AsSsize_t(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (check_off(self, off, 4)) return NULL;
    return PyLong_FromUnsignedLong(LOAD(U32(self->base, off)));
}
static PyObject *R_load64(Region *self, PyObject *arg) {
    Py_ssize_t off = PyLong_AsSsize_t(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (check_off(self, off, 8)) return NULL;
    return PyLong_FromUnsignedLongLong(LOAD(U64(self->base, off)));
}
static PyObject *R_store32(Region *self, PyObject *args) {
    Py_ssize_t off; unsigned long v;
    if (!PyArg_ParseTuple(args, "nk", &off, &v) || check_off(self, off, 4)) return NULL;
    STORE(U32(self->base, off), (uint32_t)v);
    Py_RETURN_NONE;
}
static PyObject *R_store64(Region *self, PyObject *args) {
    Py_ssize_t off; unsigned long long v;
    if (!PyArg_ParseTuple(args, "nK", &off, &v) || check_off(self, off, 8)) return NULL;
    STORE(U64(self->base, off), (uint64_t)v);
    Py_RETURN_NONE;
}
static PyObject *R_cas32(Region *self, PyObject *args) {
    Py_ssize_t off; unsigned long e, n;
    if (!PyArg_ParseTuple(args, "nkk", &off, &e, &n) || check_off(self, off, 4)) return NULL;
    uint32_t exp = (uint32_t)e;
    return PyBool_FromLong(CAS(U32(self->base, off), &exp, (uint32_t)n));
}
static PyObject *R_add32(Region *self, PyObject *args) {
    Py_ssize_t off; long d;
    if (!PyArg_ParseTuple(args, "nl", &off, &d) || check_off(self, off, 4)) return NULL;
    return PyLong_FromUnsignedLong(__atomic_fetch_add(U32(self->base, off), (uint32_t)d, __ATOMIC_SEQ_CST));
}
static PyObject *R_add64(Region *self, PyObject *args) {
    Py_ssize_t off; long long d;
    if (!PyArg_ParseTuple(args, "nL", &off, &d) || check_off(self, off, 8)) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_fetch_add(U64(self->base, off), (uint64_t)d, __ATOMIC_SEQ_CST));
}
static PyObject *R_wait32(Region *self, PyObject *args) {
    Py_ssize_t off; unsigned long expected; double timeout;
    if (!PyArg_ParseTuple(args, "nkd", &off, &expected, &timeout) || check_off(self, off, 4)
        || check_timeout(timeout)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = futex_wait(U32(self->base, off), (uint32_t)expected, timeout > 0 ? (uint64_t)(timeout * 1e9) : 0);
    Py_END_ALLOW_THREADS
    if (rc == EINTR && PyErr_CheckSignals() < 0) return NULL;
    return PyBool_FromLong(rc != ETIMEDOUT);
}
static PyObject *R_wake32(Region *self, PyObject *args) {
    Py_ssize_t off; int n = INT_MAX;
    if (!PyArg_ParseTuple(args, "n|i", &off, &n) || check_off(self, off, 4)) return NULL;
    return PyLong_FromLong(futex_wake(U32(self->base, off), n));
}
static PyObject *R_addr(Region *self, PyObject *unused) {
    return PyLong_FromVoidPtr(self->base);
}

/* -- the protocol's hot path -------------------------------------------- */
/* A wait's timeout must be a finite number of seconds, at most a day (a NaN
 * would turn into an endless wait and skip the caller's liveness checks). */
static int check_timeout(double timeout) {
    if (!(timeout >= 0.0 && timeout <= 86400.0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number of seconds from 0 to 86400");
        return -1;
    }
    return 0;
}

/* A service segment whose header promises no more than the mapping holds. */
static int check_service(Region *self) {
    if (!self->base || self->size < H_CHANNELS) {
        PyErr_SetString(PyExc_ValueError, "not a mapped service segment");
        return -1;
    }
    uint32_t n = LOAD(U32(self->base, H_MAX_CHANNELS));
    if (n == 0 || n > MAX_CHANNELS_LIMIT || H_CHANNELS + (Py_ssize_t)n * C_SIZE > self->size) {
        PyErr_SetString(PyExc_ValueError, "corrupt service segment header (max_channels)");
        return -1;
    }
    uint32_t stats = LOAD(U32(self->base, H_STATS_OFF)), nm = LOAD(U32(self->base, H_MAX_METHODS));
    if (stats && (nm > MAX_METHODS
                  || (Py_ssize_t)stats + (Py_ssize_t)MAX_WORKERS * nm * M_SIZE > self->size)) {
        PyErr_SetString(PyExc_ValueError, "corrupt service segment header (statistics)");
        return -1;
    }
    return 0;
}

static int check_slot(Region *self, long slot) {
    if (check_service(self)) return -1;
    uint32_t n = LOAD(U32(self->base, H_MAX_CHANNELS));
    if (slot < 0 || (uint32_t)slot >= n || H_CHANNELS + (slot + 1) * C_SIZE > self->size) {
        PyErr_Format(PyExc_ValueError, "channel %ld out of range", slot);
        return -1;
    }
    return 0;
}

/* Wakes one sleeping worker, if any sleeps.  Without sleepers nothing is
 * written: a worker about to sleep counts itself in H_SLEEPERS before its last
 * look at the bitmap, so it either sees our bit or we see it (seq_cst order). */
static inline int kick_workers(char *base) {
    if (LOAD(U32(base, H_SLEEPERS)) > 0) {
        __atomic_fetch_add(U32(base, H_SEQ), 1, __ATOMIC_SEQ_CST);
        return futex_wake(U32(base, H_SEQ), 1) > 0;
    }
    return 0;
}

/* Copies name+payload into the data segment and publishes the call.
 * Returns 0 when posted, 1 when it does not fit, 2 when the service is not
 * serving, -1 when posted and a sleeping worker had to be woken for it. */
static int post_call(char *base, long slot, Region *data, Py_buffer *name, Py_buffer *payload, uint32_t flags) {
    Py_ssize_t total = name->len + payload->len;
    if (total > data->size) return 1;
    if (LOAD(U32(base, H_STATE)) != SVC_SERVING) return 2;
    char *ch = base + H_CHANNELS + slot * C_SIZE;
    memcpy(data->base, name->buf, name->len);
    if (payload->len > (1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(data->base + name->len, payload->buf, payload->len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(data->base + name->len, payload->buf, payload->len);
    }
    STORE(U32(ch, C_NAME_LEN), (uint32_t)name->len);
    STORE(U64(ch, C_REQ_LEN), (uint64_t)total);
    STORE(U32(ch, C_FLAGS), flags);
    STORE(U32(ch, C_CALLER_CPU), (uint32_t)sched_getcpu());
    STORE(U32(ch, C_STATE), ST_REQUEST);
    uint64_t bit = 1ull << (slot & 63);
    __atomic_fetch_or(U64(base, H_BITMAP + (slot >> 6) * 8), bit, __ATOMIC_SEQ_CST);
    return kick_workers(base) ? -1 : 0;
}

/* Waiting for a response: a spin, then a sleep, until the channel holds a
 * response or the timeout passes.  The phases are apart so that a caller that
 * is its process's only Python thread spins holding the GIL: nobody else wants
 * it, and giving it up and taking it back costs ~70 ns, a few percent of a
 * small call.  The sleep always gives it up. */

/* Is this the only thread of the interpreter?  Then holding the GIL while
 * spinning (a few tens of microseconds at most) keeps nobody waiting. */
static int only_thread(void) {
    PyThreadState *ts = PyThreadState_Get();
    return PyInterpreterState_ThreadHead(PyThreadState_GetInterpreter(ts)) == ts && !PyThreadState_Next(ts);
}

/* 1 when the response came while spinning, 0 when it is time to sleep. */
static int spin_for_response(char *ch, int woke_worker, uint64_t start) {
    uint32_t *st = U32(ch, C_STATE);
    if ((LOAD(st) & ST_CODE) == ST_RESPONSE) return 1;
    if (!client_spin.budget_ns || system_overloaded(start)) return 0;
    int cpu = sched_getcpu();
    /* a worker we just woke may have been put on our CPU: let it run at once */
    uint64_t yield_after = woke_worker ? 0 : YIELD_AFTER_NS, stop = start + client_spin.budget_ns, t;
    for (unsigned i = 1;; i++) {
        uint32_t s = LOAD(st);
        if ((s & ST_CODE) == ST_RESPONSE) return 1;
        cpu_relax();
        if ((i & 15) == 0) {
            /* a worker on our CPU cannot answer while we spin: sleep at once */
            if ((s & ST_CODE) == ST_CLAIMED && (int)LOAD(U32(ch, C_WORKER_CPU)) == cpu) return 0;
            t = now_ns();
            if (t >= stop) return 0;
            if (t - start >= yield_after) sched_yield(); /* a peer on this CPU gets to run */
        }
    }
}

/* 1 when ready, 0 on timeout, -1 when interrupted by a signal.  Without the GIL. */
static int sleep_for_response(char *ch, uint64_t start, uint64_t deadline) {
    uint32_t *st = U32(ch, C_STATE);
    int ready = 0;
    for (;;) {
        uint32_t s = LOAD(st);
        if ((s & ST_CODE) == ST_RESPONSE) { ready = 1; break; }
        if (!(s & ST_WAITING)) {
            uint32_t e = s;
            if (!CAS(st, &e, s | ST_WAITING)) continue;
            s |= ST_WAITING;
        }
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (futex_wait(st, s, deadline - t) == EINTR) { ready = -1; break; }
    }
    spin_adapt(&client_spin, 0, now_ns() - start);
    return ready;
}

/* Both phases; as sleep_for_response.  Called with the GIL. */
static int await_response(char *ch, double timeout, int woke_worker) {
    uint64_t start = now_ns(), deadline = start + (uint64_t)(timeout * 1e9);
    int alone = only_thread(), ready = alone && spin_for_response(ch, woke_worker, start);
    if (!ready) {
        Py_BEGIN_ALLOW_THREADS
        if (!alone) ready = spin_for_response(ch, woke_worker, start);
        if (!ready) ready = sleep_for_response(ch, start, deadline);
        Py_END_ALLOW_THREADS
    }
    return ready;
}

static int get_data(PyObject *obj, PyTypeObject *type, Region **out) {
    if (!PyObject_TypeCheck(obj, type)) { PyErr_SetString(PyExc_TypeError, "data must be a Region"); return -1; }
    *out = (Region *)obj;
    return 0;
}

static PyObject *response_fields(char *ch) {
    return Py_BuildValue("(kKKk)", (unsigned long)LOAD(U32(ch, C_STATUS)),
                         (unsigned long long)LOAD(U64(ch, C_RESP_OFF)),
                         (unsigned long long)LOAD(U64(ch, C_RESP_LEN)),
                         (unsigned long)LOAD(U32(ch, C_DATA_GEN)));
}

/* wait_reply(slot, timeout) -> (status, resp_off, resp_len, data_gen) or None
 * None means the timeout passed with the call still in flight: the caller
 * checks the worker is alive and its own deadline, then waits again. */
static PyObject *R_wait_reply(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "wait_reply takes 2 arguments"); return NULL; }
    long slot = PyLong_AsLong(args[0]);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(self, slot)) return NULL;
    double timeout = PyFloat_AsDouble(args[1]);
    if ((timeout == -1.0 && PyErr_Occurred()) || check_timeout(timeout)) return NULL;
    char *ch = self->base + H_CHANNELS + slot * C_SIZE;
    int ready = await_response(ch, timeout, 0);
    if (ready < 0 && PyErr_CheckSignals() < 0) return NULL;
    if (ready <= 0) Py_RETURN_NONE;
    return response_fields(ch);
}

#define SMALL_RESPONSE 65536

/* call(slot, data_region, name, payload, flags, timeout): post + wait in one go.
 * Returns the bytes of a small successful response that came back in the same
 * data segment, (status, bytes) for a small error response, else an int:
 * 1 request too big (nothing posted), 2 not serving, 3 still in flight at the
 * timeout, 4 ready (read it with wait_reply). */
/* The (slot, data_region) arguments a channel method starts with. */
static int slot_and_data(Region *self, PyObject *const *args, long *slot, Region **data) {
    *slot = PyLong_AsLong(args[0]);
    if ((*slot == -1 && PyErr_Occurred()) || check_slot(self, *slot)) return -1;
    return get_data(args[1], Py_TYPE(self), data);
}

static int flags_arg(PyObject *obj, uint32_t *flags) {
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    *flags = (uint32_t)v;
    return 0;
}

static int timeout_arg(PyObject *obj, double *timeout) {
    *timeout = PyFloat_AsDouble(obj);
    return (*timeout == -1.0 && PyErr_Occurred()) || check_timeout(*timeout) ? -1 : 0;
}

/* Posts; returns post_call's code, or -2 with an exception set. */
static int post_channel(Region *self, long slot, Region *data, PyObject *name_obj, PyObject *payload_obj,
                        uint32_t flags) {
    Py_buffer name, payload;
    if (PyObject_GetBuffer(name_obj, &name, PyBUF_SIMPLE) < 0) return -2;
    if (PyObject_GetBuffer(payload_obj, &payload, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&name); return -2; }
    int rc = post_call(self->base, slot, data, &name, &payload, flags);
    PyBuffer_Release(&name);
    PyBuffer_Release(&payload);
    return rc;
}

static PyObject *collect_channel(Region *self, long slot, Region *data, double timeout, int woke_worker);

static PyObject *call_channel(Region *self, long slot, Region *data, PyObject *name_obj, PyObject *payload_obj,
                              uint32_t flags, double timeout) {
    int rc = post_channel(self, slot, data, name_obj, payload_obj, flags);
    if (rc == -2) return NULL;
    if (rc > 0) return PyLong_FromLong(rc);
    return collect_channel(self, slot, data, timeout, rc < 0);
}

/* The response of a posted call, as call() returns it. */
static PyObject *collect_channel(Region *self, long slot, Region *data, double timeout, int woke_worker) {
    char *ch = self->base + H_CHANNELS + slot * C_SIZE;
    int ready = await_response(ch, timeout, woke_worker);
    if (ready < 0 && PyErr_CheckSignals() < 0) return NULL;
    if (ready <= 0) return PyLong_FromLong(3);
    uint64_t off = LOAD(U64(ch, C_RESP_OFF)), len = LOAD(U64(ch, C_RESP_LEN));
    uint32_t gen = LOAD(U32(ch, C_DATA_GEN));
    if (len > SMALL_RESPONSE || gen != LOAD(U32(ch, C_DATA_GEN)) || off + len > (uint64_t)data->size
        || LOAD(U64(ch, C_DATA_CAP)) != (uint64_t)data->size)
        return PyLong_FromLong(4);
    PyObject *body = PyBytes_FromStringAndSize(data->base + off, (Py_ssize_t)len);
    if (!body) return NULL;
    uint32_t st = LOAD(U32(ch, C_STATUS));
    if (st == 0) return body;   /* the common case: no tuple to build and take apart */
    PyObject *status = PyLong_FromUnsignedLong(st);
    if (!status) { Py_DECREF(body); return NULL; }
    PyObject *res = PyTuple_Pack(2, status, body);
    Py_DECREF(status); Py_DECREF(body);
    return res;
}

/* post(slot, data_region, name, payload, flags): the first half of call().
 * 0 posted, -1 posted and a sleeping worker woken for it, 1 request too big
 * (nothing posted), 2 not serving (nothing posted). */
static PyObject *R_post(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) { PyErr_SetString(PyExc_TypeError, "post takes 5 arguments"); return NULL; }
    long slot; Region *data; uint32_t flags;
    if (slot_and_data(self, args, &slot, &data) || flags_arg(args[4], &flags)) return NULL;
    int rc = post_channel(self, slot, data, args[2], args[3], flags);
    return rc == -2 ? NULL : PyLong_FromLong(rc);
}

/* collect(slot, data_region, timeout, woke): the second half of call(), for a
 * call that post() posted (woke: what post() said about waking a worker). */
static PyObject *R_collect(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) { PyErr_SetString(PyExc_TypeError, "collect takes 4 arguments"); return NULL; }
    long slot; Region *data; double timeout;
    if (slot_and_data(self, args, &slot, &data) || timeout_arg(args[2], &timeout)) return NULL;
    int woke = PyObject_IsTrue(args[3]);
    if (woke < 0) return NULL;
    return collect_channel(self, slot, data, timeout, woke);
}

static PyObject *R_call(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) { PyErr_SetString(PyExc_TypeError, "call takes 6 arguments"); return NULL; }
    long slot; Region *data; uint32_t flags; double timeout;
    if (slot_and_data(self, args, &slot, &data) || flags_arg(args[4], &flags) || timeout_arg(args[5], &timeout))
        return NULL;
    return call_channel(self, slot, data, args[2], args[3], flags, timeout);
}

/* Claims one posted call: clears its bit, then moves its state from REQUEST
 * to CLAIMED|pid in one CAS, so a call is never owned by nobody.  Returns the
 * slot or -1.  Scanning resumes after the last slot served, for fairness. */
static long try_claim(Region *self, uint32_t pid) {
    char *base = self->base;
    uint32_t n = LOAD(U32(base, H_MAX_CHANNELS));
    uint32_t words = (n + 63) / 64, start = (self->last_slot + 1) % n;
    for (uint32_t k = 0; k <= words; k++) {
        uint32_t w = (start / 64 + k) % words;
        uint64_t *word = U64(base, H_BITMAP + w * 8);
        uint64_t bits = LOAD(word);
        if (k == 0) bits &= ~0ull << (start & 63);          /* from `start` on... */
        else if (k == words) bits &= (start & 63) ? ~(~0ull << (start & 63)) : 0; /* ...wrapping round */
        while (bits) {
            int b = __builtin_ctzll(bits);
            bits &= bits - 1;
            uint64_t mask = 1ull << b;
            uint64_t old = __atomic_fetch_and(word, ~mask, __ATOMIC_SEQ_CST);
            if (!(old & mask)) continue;
            long slot = (long)w * 64 + b;
            uint32_t *st = U32(base, H_CHANNELS + slot * C_SIZE + C_STATE);
            uint32_t s = LOAD(st);
            while ((s & ST_CODE) == ST_REQUEST) {
                if (CAS(st, &s, (s & ST_WAITING) | ST_CLAIMED | (pid << ST_PID_SHIFT))) {
                    self->last_slot = (uint32_t)slot;
                    STORE(U32(base, H_CHANNELS + slot * C_SIZE + C_WORKER_CPU), (uint32_t)sched_getcpu());
                    return slot;
                }
            }
            /* cancelled by its caller before we got to it */
        }
    }
    return -1;
}

static int any_posted(char *base) {
    uint32_t n = LOAD(U32(base, H_MAX_CHANNELS)), words = (n + 63) / 64;
    for (uint32_t w = 0; w < words; w++) if (LOAD(U64(base, H_BITMAP + w * 8))) return 1;
    return 0;
}

/* Claiming the next posted call: a spin, then a sleep until the deadline; apart
 * like the caller's wait, so a worker that is its process's only Python thread
 * (the usual case) spins holding the GIL. */

/* The slot claimed at once or while spinning, or -1 when it is time to sleep. */
static long claim_spin(Region *self, uint32_t pid, uint64_t start, int *spun_ok) {
    char *base = self->base;
    long slot = try_claim(self, pid);
    /* the caller we just answered will post its next call soon, unless it
     * needs this CPU to do so: then spinning would only delay it */
    if (slot >= 0 || !worker_spin.budget_ns || self->last_caller_cpu == sched_getcpu() || system_overloaded(start))
        return slot;
    uint64_t stop = start + worker_spin.budget_ns, t;
    for (unsigned i = 1;; i++) {
        if (any_posted(base) && (slot = try_claim(self, pid)) >= 0) { *spun_ok = 1; return slot; }
        cpu_relax();
        if ((i & 15) == 0) {
            t = now_ns();
            if (t >= stop) return -1;
            if (t - start > YIELD_AFTER_NS) sched_yield();
        }
    }
}

/* The slot, -1 on timeout (or when the service stops with nothing posted),
 * -2 when interrupted.  Without the GIL. */
static long claim_sleep(Region *self, uint32_t pid, uint64_t deadline) {
    char *base = self->base;
    long slot = -1;
    while (slot < 0) {
        if (LOAD(U32(base, H_STATE)) != SVC_SERVING && !any_posted(base)) break;
        uint32_t seq = LOAD(U32(base, H_SEQ));
        if ((slot = try_claim(self, pid)) >= 0) break;
        __atomic_fetch_add(U32(base, H_SLEEPERS), 1, __ATOMIC_SEQ_CST);
        if (any_posted(base)) {
            __atomic_fetch_sub(U32(base, H_SLEEPERS), 1, __ATOMIC_SEQ_CST);
            continue;
        }
        uint64_t t = now_ns();
        int rc = t < deadline ? futex_wait(U32(base, H_SEQ), seq, deadline - t) : ETIMEDOUT;
        __atomic_fetch_sub(U32(base, H_SLEEPERS), 1, __ATOMIC_SEQ_CST);
        if (rc == EINTR) { slot = -2; break; }
        if (rc == ETIMEDOUT) { slot = try_claim(self, pid); break; }
    }
    return slot;
}

/* Both phases; returns as claim_sleep.  Called with the GIL. */
static long claim_next(Region *self, char *w, uint64_t deadline) {
    uint32_t pid = LOAD(U32(w, W_PID));
    uint64_t start = now_ns();
    int spun_ok = 0, alone = only_thread();
    long slot = alone ? claim_spin(self, pid, start, &spun_ok) : -1;
    if (slot < 0) {
        Py_BEGIN_ALLOW_THREADS
        if (!alone) slot = claim_spin(self, pid, start, &spun_ok);
        if (slot < 0) slot = claim_sleep(self, pid, deadline);
        Py_END_ALLOW_THREADS
    }
    uint64_t t = now_ns();
    spin_adapt(&worker_spin, spun_ok, t - start);
    if (slot >= 0) {
        STORE(U32(w, W_STATE), 2u);
        STORE(U64(w, W_CLAIM_NS), t);
    }
    return slot;
}

static int check_worker(long widx) {
    if (widx < 0 || widx >= MAX_WORKERS) { PyErr_SetString(PyExc_ValueError, "bad worker index"); return -1; }
    return 0;
}

static PyObject *call_tuple(char *base, long slot) {
    char *ch = base + H_CHANNELS + slot * C_SIZE;
    return Py_BuildValue("(slkkkKk)", "call", slot,
                         (unsigned long)LOAD(U32(ch, C_OWNER_PID)),
                         (unsigned long)LOAD(U32(ch, C_DATA_GEN)),
                         (unsigned long)LOAD(U32(ch, C_NAME_LEN)),
                         (unsigned long long)LOAD(U64(ch, C_REQ_LEN)),
                         (unsigned long)LOAD(U32(ch, C_FLAGS)));
}

/* Writes a response and hands the channel back to its caller.  A payload that
 * already lies inside the data segment (a raw method returning a slice of its
 * argument) is not copied: only its offset is published.  Returns 1 when
 * delivered, 0 when the caller abandoned the call meanwhile, -1 when it does
 * not fit (nothing written). */
static void record_call(char *base, char *w, long method, uint64_t ns, uint32_t status) {
    uint32_t stats = LOAD(U32(base, H_STATS_OFF)), nmethods = LOAD(U32(base, H_MAX_METHODS));
    if (method < 0 || (uint32_t)method >= nmethods || !stats) return;
    long widx = (long)((w - (base + H_WORKERS)) / W_SIZE);
    char *m = base + stats + ((uint64_t)widx * nmethods + (uint64_t)method) * M_SIZE;
    __atomic_fetch_add(U64(m, M_CALLS), 1, __ATOMIC_RELAXED);
    if (status) __atomic_fetch_add(U64(m, M_ERRORS), 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(U64(m, M_TOTAL_NS), ns, __ATOMIC_RELAXED);
    if (ns > LOAD(U64(m, M_MAX_NS))) STORE(U64(m, M_MAX_NS), ns);
    uint64_t us = ns / 1000;
    int b = us ? 64 - __builtin_clzll(us) : 0;   /* us < 2^b */
    if (b >= M_NBUCKETS) b = M_NBUCKETS - 1;
    __atomic_fetch_add(U64(m, M_BUCKETS + 8 * b), 1, __ATOMIC_RELAXED);
}

static int publish_reply(Region *self, char *w, long slot, Region *data, uint32_t status, Py_buffer *payload,
                         long method) {
    char *base = self->base, *ch = base + H_CHANNELS + slot * C_SIZE;
    self->last_caller_cpu = (int)LOAD(U32(ch, C_CALLER_CPU));
    uint64_t off = 0;
    char *p = payload->buf;
    if (p >= data->base && p + payload->len <= data->base + data->size) {
        off = (uint64_t)(p - data->base);
    } else if (payload->len > data->size) {
        return -1;
    } else if (payload->len > (1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(data->base, p, payload->len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(data->base, p, payload->len);
    }
    STORE(U32(ch, C_STATUS), status);
    STORE(U64(ch, C_RESP_OFF), off);
    STORE(U64(ch, C_RESP_LEN), (uint64_t)payload->len);
    uint32_t pid = LOAD(U32(w, W_PID));
    uint32_t *st = U32(ch, C_STATE);
    uint32_t s = LOAD(st);
    int delivered = 0;
    while ((s & ~ST_WAITING) == (ST_CLAIMED | (pid << ST_PID_SHIFT))) {
        if (CAS(st, &s, ST_RESPONSE)) {
            delivered = 1;
            if (s & ST_WAITING) futex_wake(st, INT_MAX);
            break;
        }
    }
    uint64_t t = now_ns(), took = t - LOAD(U64(w, W_CLAIM_NS));
    __atomic_fetch_add(U64(w, W_BUSY_NS), took, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(U64(w, W_CALLS), 1, __ATOMIC_SEQ_CST);
    if (status != 0) __atomic_fetch_add(U64(w, W_ERRORS), 1, __ATOMIC_SEQ_CST);
    STORE(U32(w, W_STATE), 1u);
    record_call(base, w, method, took, status);
    return delivered;
}

/* reply(worker_index, slot, data_region, status, payload[, method_index]) -> bool (False: abandoned) */
static PyObject *R_reply(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 && nargs != 6) { PyErr_SetString(PyExc_TypeError, "reply takes 5 or 6 arguments"); return NULL; }
    long method = nargs == 6 ? PyLong_AsLong(args[5]) : -1;
    if (method == -1 && PyErr_Occurred()) return NULL;
    long widx = PyLong_AsLong(args[0]);
    if ((widx == -1 && PyErr_Occurred()) || check_worker(widx)) return NULL;
    long slot = PyLong_AsLong(args[1]);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(self, slot)) return NULL;
    Region *data;
    if (get_data(args[2], Py_TYPE(self), &data)) return NULL;
    unsigned long status = PyLong_AsUnsignedLong(args[3]);
    if (status == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    Py_buffer payload;
    if (PyObject_GetBuffer(args[4], &payload, PyBUF_SIMPLE) < 0) return NULL;
    int rc = publish_reply(self, self->base + H_WORKERS + widx * W_SIZE, slot, data, (uint32_t)status, &payload,
                           method);
    Py_ssize_t len = payload.len;
    PyBuffer_Release(&payload);
    if (rc < 0) {
        PyErr_Format(PyExc_ValueError, "response of %zd bytes does not fit a %zd-byte channel", len, data->size);
        return NULL;
    }
    return PyBool_FromLong(rc);
}

/* serve(worker_index, channels, handlers, stop, timeout)
 * The worker's loop for the common case, without returning to Python between
 * calls.  channels[slot] is None or (owner, gen, data_region, readonly_view);
 * handlers maps a method name (bytes) to (handler, wants_view, method_index, fast),
 * where handler(flags, request) -> (status, payload), request is a read-only
 * view into the channel, or bytes for a small request unless wants_view, and
 * fast is None or a fast path (see run_method).  Returns None at the timeout
 * (for housekeeping) or when
 * stop[0] is true, or hands back what it cannot do itself:
 * ("call", slot, owner, gen, name_len, req_len, flags): a claimed call on a
 *     channel not mapped yet, or for an unknown method;
 * ("reply", slot, status, payload, method_index): a response larger than the channel, or
 *     one that is not (int, contiguous bytes);
 * ("abandoned", slot): the caller gave up on the call just answered. */
/* Runs one method: handler(flags, request) -> (status, payload), or, for a
 * method with a fast path (dispatch.fast_path: fn, loads, dumps, flags,
 * call_failed, encode_failed), the handler's common case without its Python
 * frame.  What the fast path cannot decode goes to the handler, which reports
 * it; what the method raises goes to call_failed, a result dumps refuses to
 * encode_failed. */
static PyObject *status_ok;   /* 0, made once */

static PyObject *run_method(PyObject *handler, PyObject *fast, uint32_t flags, PyObject *request) {
    if (PyTuple_Check(fast) && PyTuple_GET_SIZE(fast) == 6) {
        unsigned long fast_flags = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(fast, 3));
        if (fast_flags == (unsigned long)-1 && PyErr_Occurred()) return NULL;
        if (fast_flags == flags) {
            PyObject *args = PyObject_CallOneArg(PyTuple_GET_ITEM(fast, 1), request);
            if (args && PyList_CheckExact(args)) {
                PyObject *tuple = PyList_AsTuple(args);
                Py_DECREF(args);
                if (!tuple) return NULL;
                PyObject *value = PyObject_Call(PyTuple_GET_ITEM(fast, 0), tuple, NULL);
                Py_DECREF(tuple);
                if (!value) {
                    PyObject *type, *exc, *tb;
                    PyErr_Fetch(&type, &exc, &tb);
                    PyErr_NormalizeException(&type, &exc, &tb);
                    /* no traceback: the call itself raised (the arguments do not fit) */
                    PyException_SetTraceback(exc, tb ? tb : Py_None);
                    Py_XDECREF(type);
                    Py_XDECREF(tb);
                    PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(fast, 4), exc);
                    Py_DECREF(exc);
                    return r;
                }
                PyObject *payload = PyObject_CallOneArg(PyTuple_GET_ITEM(fast, 2), value);
                if (payload) {
                    Py_DECREF(value);
                    PyObject *r = PyTuple_Pack(2, status_ok, payload);
                    Py_DECREF(payload);
                    return r;
                }
                if (!PyErr_ExceptionMatches(PyExc_Exception)) { Py_DECREF(value); return NULL; }
                PyErr_Clear();
                PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(fast, 5), value);
                Py_DECREF(value);
                return r;
            }
            if (args) Py_DECREF(args);
            else if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
            else PyErr_Clear();
        }
    }
    PyObject *hargs[2] = {PyLong_FromUnsignedLong(flags), request};
    if (!hargs[0]) return NULL;
    PyObject *result = PyObject_Vectorcall(handler, hargs, 2, NULL);
    Py_DECREF(hargs[0]);
    return result;
}

/* The last method served, so a run of calls to one method skips building the
 * name and looking it up.  Holds references for one serve() call only. */
typedef struct { PyObject *name, *spec; } method_cache;

static PyObject *serve_loop(Region *self, PyObject *const *args, Py_ssize_t nargs, method_cache *mc);

static PyObject *R_serve(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    method_cache mc = {NULL, NULL};
    PyObject *res = serve_loop(self, args, nargs, &mc);
    Py_XDECREF(mc.name);
    Py_XDECREF(mc.spec);
    return res;
}

static PyObject *serve_loop(Region *self, PyObject *const *args, Py_ssize_t nargs, method_cache *mc) {
    if (nargs != 5) { PyErr_SetString(PyExc_TypeError, "serve takes 5 arguments"); return NULL; }
    long widx = PyLong_AsLong(args[0]);
    if ((widx == -1 && PyErr_Occurred()) || check_worker(widx)) return NULL;
    PyObject *channels = args[1], *handlers = args[2], *stop = args[3];
    if (!PyList_Check(channels) || !PyDict_Check(handlers) || !PyList_Check(stop) || PyList_GET_SIZE(stop) < 1) {
        PyErr_SetString(PyExc_TypeError, "serve(int, list, dict, list, float)"); return NULL;
    }
    double timeout = PyFloat_AsDouble(args[4]);
    if ((timeout == -1.0 && PyErr_Occurred()) || check_timeout(timeout) || check_service(self)) return NULL;
    char *base = self->base, *w = base + H_WORKERS + widx * W_SIZE;
    uint64_t deadline = now_ns() + (uint64_t)(timeout * 1e9);
    for (;;) {
        if (PyObject_IsTrue(PyList_GET_ITEM(stop, 0))) Py_RETURN_NONE;
        long slot = claim_next(self, w, deadline);
        if (slot == -2) { if (PyErr_CheckSignals() < 0) return NULL; continue; }
        if (slot < 0) Py_RETURN_NONE;
        char *ch = base + H_CHANNELS + slot * C_SIZE;
        uint32_t owner = LOAD(U32(ch, C_OWNER_PID)), gen = LOAD(U32(ch, C_DATA_GEN));
        uint32_t name_len = LOAD(U32(ch, C_NAME_LEN)), flags = LOAD(U32(ch, C_FLAGS));
        uint64_t req_len = LOAD(U64(ch, C_REQ_LEN));
        PyObject *entry = slot < PyList_GET_SIZE(channels) ? PyList_GET_ITEM(channels, slot) : Py_None;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4
            || PyLong_AsUnsignedLong(PyTuple_GET_ITEM(entry, 0)) != owner
            || PyLong_AsUnsignedLong(PyTuple_GET_ITEM(entry, 1)) != gen
            || !PyObject_TypeCheck(PyTuple_GET_ITEM(entry, 2), Py_TYPE(self))) {
            PyErr_Clear();
            return call_tuple(base, slot);
        }
        Region *data = (Region *)PyTuple_GET_ITEM(entry, 2);
        if (req_len > (uint64_t)data->size || name_len > req_len) return call_tuple(base, slot);
        Py_INCREF(entry); /* keeps the data region mapped through the call, whatever Python code runs */
        PyObject *spec;
        if (mc->name && PyBytes_GET_SIZE(mc->name) == (Py_ssize_t)name_len
            && memcmp(PyBytes_AS_STRING(mc->name), data->base, name_len) == 0) {
            spec = mc->spec;
        } else {
            PyObject *name = PyBytes_FromStringAndSize(data->base, name_len);
            if (!name) { Py_DECREF(entry); return NULL; }
            spec = PyDict_GetItemWithError(handlers, name);
            if (!spec) {
                Py_DECREF(name);
                Py_DECREF(entry);
                return PyErr_Occurred() ? NULL : call_tuple(base, slot);
            }
            Py_XSETREF(mc->name, name);
            Py_INCREF(spec);
            Py_XSETREF(mc->spec, spec);
        }
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 4) {
            PyErr_SetString(PyExc_TypeError, "handlers values must be (handler, wants_view, method_index, fast)");
            Py_DECREF(entry);
            return NULL;
        }
        long method = PyLong_AsLong(PyTuple_GET_ITEM(spec, 2));
        if (method == -1 && PyErr_Occurred()) { Py_DECREF(entry); return NULL; }
        Py_INCREF(spec);   /* the cache may drop it while the method runs */
        PyObject *handler = PyTuple_GET_ITEM(spec, 0);
        /* A small request is cheaper to hand over as bytes than as a view; raw
         * methods always get a view, so their argument has one type. */
        PyObject *request = (!PyObject_IsTrue(PyTuple_GET_ITEM(spec, 1)) && req_len - name_len <= 4096)
            ? PyBytes_FromStringAndSize(data->base + name_len, (Py_ssize_t)(req_len - name_len))
            : PySequence_GetSlice(PyTuple_GET_ITEM(entry, 3), name_len, (Py_ssize_t)req_len);
        PyObject *result = request ? run_method(handler, PyTuple_GET_ITEM(spec, 3), flags, request) : NULL;
        Py_XDECREF(request);
        Py_DECREF(spec);
        if (!result) { Py_DECREF(entry); return NULL; }  /* handlers catch everything: only a bug lands here */
        PyObject *status = PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 2 ? PyTuple_GET_ITEM(result, 0) : NULL;
        unsigned long st = status ? PyLong_AsUnsignedLong(status) : (unsigned long)-1;
        Py_buffer payload;
        if (st == (unsigned long)-1 || PyObject_GetBuffer(PyTuple_GET_ITEM(result, 1), &payload, PyBUF_SIMPLE) < 0) {
            /* not (status, contiguous bytes): Python turns it into an error response */
            PyErr_Clear();
            Py_DECREF(entry);
            PyObject *odd = status ? Py_BuildValue("(slOOl)", "reply", slot, status, PyTuple_GET_ITEM(result, 1), method)
                                   : Py_BuildValue("(slkOl)", "reply", slot, 1ul, result, method);
            Py_DECREF(result);
            return odd;
        }
        int rc = publish_reply(self, w, slot, data, (uint32_t)st, &payload, method);
        PyBuffer_Release(&payload);
        Py_DECREF(entry);
        if (rc < 0) {
            PyObject *big = Py_BuildValue("(slOOl)", "reply", slot, status, PyTuple_GET_ITEM(result, 1), method);
            Py_DECREF(result);
            return big;
        }
        Py_DECREF(result);
        if (rc == 0) return Py_BuildValue("(sl)", "abandoned", slot); /* Python frees the channel */
        if (PyErr_CheckSignals() < 0) return NULL;
        if (now_ns() >= deadline) Py_RETURN_NONE;
    }
}

static PyObject *R_enter(PyObject *self, PyObject *unused) { Py_INCREF(self); return self; }

static PyObject *R_release(Region *self, PyObject *unused) {
    if (self->owns) {
        if (self->exports) { PyErr_SetString(PyExc_BufferError, "region has exported views"); return NULL; }
        if (self->base) munmap(self->base, self->size);
    } else if (self->base) PyBuffer_Release(&self->view);
    self->base = NULL; self->size = 0;
    Py_RETURN_NONE;
}

/* The buffer protocol, for mappings made by map_fd: memoryview(region). */
static int Region_getbuffer(Region *self, Py_buffer *view, int flags) {
    if (!self->owns || !self->base) {
        PyErr_SetString(PyExc_BufferError, "only a mapping made by map_fd exports a buffer");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->base, self->size, 0, flags) < 0) return -1;
    self->exports++;
    return 0;
}
static void Region_releasebuffer(Region *self, Py_buffer *view) { self->exports--; }
static PyBufferProcs Region_as_buffer = {(getbufferproc)Region_getbuffer, (releasebufferproc)Region_releasebuffer};

static PyMethodDef Region_methods[] = {
    {"load32", (PyCFunction)R_load32, METH_O, "atomic load of a u32 at offset"},
    {"load64", (PyCFunction)R_load64, METH_O, "atomic load of a u64 at offset"},
    {"store32", (PyCFunction)R_store32, METH_VARARGS, "atomic store of a u32"},
    {"store64", (PyCFunction)R_store64, METH_VARARGS, "atomic store of a u64"},
    {"cas32", (PyCFunction)R_cas32, METH_VARARGS, "compare-and-swap a u32; True if swapped"},
    {"add32", (PyCFunction)R_add32, METH_VARARGS, "atomic fetch-add on a u32; returns the old value"},
    {"add64", (PyCFunction)R_add64, METH_VARARGS, "atomic fetch-add on a u64; returns the old value"},
    {"wait32", (PyCFunction)R_wait32, METH_VARARGS, "futex wait while the u32 equals expected; False on timeout"},
    {"wake32", (PyCFunction)R_wake32, METH_VARARGS, "futex wake up to n waiters"},
    {"addr", (PyCFunction)R_addr, METH_NOARGS, "base address (for tests)"},
    {"wait_reply", (PyCFunction)(void (*)(void))R_wait_reply, METH_FASTCALL, "wait for a channel's response"},
    {"call", (PyCFunction)(void (*)(void))R_call, METH_FASTCALL, "post a call and wait for its response"},
    {"post", (PyCFunction)(void (*)(void))R_post, METH_FASTCALL, "post a call (the first half of call)"},
    {"collect", (PyCFunction)(void (*)(void))R_collect, METH_FASTCALL,
     "wait for a posted call's response (the second half of call)"},
    {"serve", (PyCFunction)(void (*)(void))R_serve, METH_FASTCALL, "a worker's serving loop for the common case"},
    {"reply", (PyCFunction)(void (*)(void))R_reply, METH_FASTCALL, "publish a response"},
    {"release", (PyCFunction)R_release, METH_NOARGS, "drop the buffer (the region is unusable after)"},
    {"__enter__", (PyCFunction)R_enter, METH_NOARGS, NULL},
    {NULL}
};

static PyObject *Region_get_size(Region *self, void *c) { return PyLong_FromSsize_t(self->size); }
static PyGetSetDef Region_getset[] = {{"size", (getter)Region_get_size, NULL, "size in bytes", NULL}, {NULL}};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A writable, 64-byte aligned buffer (an mmap) with atomics and futex operations.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Region_init,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_methods = Region_methods,
    .tp_getset = Region_getset,
    .tp_as_buffer = &Region_as_buffer,
};

/* ---- ShmMethod: a client's method, the common case in C -------------------
 * A generated client method costs two Python frames and a dozen attribute
 * lookups above the codec and the wait; for a small call that is a third of
 * the round trip.  This does the common case (positional arguments, a free
 * channel, a small successful response) in C and leaves everything else to
 * Python: `fallback` (the method in Python) for keyword arguments or arguments
 * the codec refuses, the transport's call() when it has no attachment or free
 * channel yet, its _resume() for any outcome of the call but a small success,
 * and its _abort() when the wait is interrupted. */
typedef struct {
    PyObject_HEAD
    PyObject *dict, *weakrefs;
    PyObject *transport, *name, *codec, *dumps, *loads, *timeout, *fallback, *flags_obj;
    double slice;
    uint32_t flags;
    vectorcallfunc vectorcall;
} ShmMethod;

static PyTypeObject ShmMethodType;
static PyObject *s_channels, *s_free, *s_region, *s_slot, *s_closed, *s_resume, *s_abort, *s_give_back, *s_call;

static PyObject *SM_fallback(ShmMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

/* The wait raised (a signal handler's exception): settle the channel, re-raise. */
static PyObject *SM_abort(ShmMethod *self, PyObject *chans, PyObject *ch) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodObjArgs(self->transport, s_abort, chans, ch, NULL);
    if (r) Py_DECREF(r);
    else PyErr_WriteUnraisable(self->transport);   /* the interruption is what the caller must see */
    PyErr_Restore(type, value, tb);
    return NULL;
}

static PyObject *SM_call(ShmMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames && PyTuple_GET_SIZE(kwnames)) return SM_fallback(self, args, nargsf, kwnames);
    PyObject *payload;
    if (self->dumps == Py_None) {   /* raw: the one bytes argument is the payload */
        if (n != 1 || !PyBytes_CheckExact(args[0])) return SM_fallback(self, args, nargsf, kwnames);
        payload = Py_NewRef(args[0]);
    } else {
        PyObject *tuple = PyTuple_New(n);
        if (!tuple) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
        payload = PyObject_CallOneArg(self->dumps, tuple);
        Py_DECREF(tuple);
        if (!payload) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
            PyErr_Clear();   /* the fallback encodes again and raises a clear error */
            return SM_fallback(self, args, nargsf, kwnames);
        }
    }
    PyObject *chans = NULL, *free = NULL, *ch = NULL, *svc = NULL, *data = NULL, *slot_obj = NULL, *got = NULL,
             *result = NULL;
    chans = PyObject_GetAttr(self->transport, s_channels);
    if (!chans) goto done;
    if (chans == Py_None) goto slow;   /* not attached yet */
    svc = PyObject_GetAttr(chans, s_region);
    if (!svc) goto done;
    if (!PyObject_TypeCheck(svc, &RegionType)) goto slow;
    free = PyObject_GetAttr(chans, s_free);
    if (!free) goto done;
    if (!PyList_CheckExact(free) || PyList_GET_SIZE(free) == 0) goto slow;
    Py_ssize_t last = PyList_GET_SIZE(free) - 1;
    ch = Py_NewRef(PyList_GET_ITEM(free, last));
    if (PyList_SetSlice(free, last, last + 1, NULL) < 0) { Py_CLEAR(ch); goto done; }
    /* from here on the channel is ours: every path gives it back */
    data = PyObject_GetAttr(ch, s_region);
    slot_obj = data ? PyObject_GetAttr(ch, s_slot) : NULL;
    long slot = slot_obj ? PyLong_AsLong(slot_obj) : -1;
    if (slot == -1 && PyErr_Occurred()) { result = SM_abort(self, chans, ch); goto done; }
    if (!PyObject_TypeCheck(data, &RegionType) || check_slot((Region *)svc, slot)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "bad channel");
        result = SM_abort(self, chans, ch);
        goto done;
    }
    got = call_channel((Region *)svc, slot, (Region *)data, self->name, payload, self->flags, self->slice);
    /* A signal that came while spinning is handled here, while the channel is still
     * ours to settle: the next Python code to run might not give it back. */
    if (!got || PyErr_CheckSignals() < 0) { result = SM_abort(self, chans, ch); goto done; }
    if (PyBytes_CheckExact(got)) {
        result = PyObject_CallOneArg(self->loads, got);
        if (result) {
            PyObject *closed = PyObject_GetAttr(chans, s_closed);
            if (!closed || (closed == Py_False && PyList_Append(free, ch) < 0)) {   /* (out of memory) */
                Py_XDECREF(closed);
                Py_CLEAR(result);
                result = SM_abort(self, chans, ch);   /* which gives the channel back */
                goto done;
            }
            if (closed != Py_False) {   /* closed while the call ran: Python frees the channel */
                PyObject *r = PyObject_CallMethodObjArgs(self->transport, s_give_back, chans, ch, NULL);
                if (r) Py_DECREF(r); else Py_CLEAR(result);
            }
            Py_DECREF(closed);
            goto done;
        }
        if (!PyErr_ExceptionMatches(PyExc_Exception)) { result = SM_abort(self, chans, ch); goto done; }
        PyErr_Clear();   /* _resume decodes it in Python and reports what is wrong */
    }
    result = PyObject_CallMethodObjArgs(self->transport, s_resume, chans, ch, got, self->name, payload,
                                        self->flags_obj, self->codec, self->timeout, NULL);
    goto done;
slow:   /* the transport does the rest in Python, with the arguments already encoded */
    result = PyObject_CallMethodObjArgs(self->transport, s_call, self->name, payload, self->flags_obj, self->codec,
                                        self->timeout, NULL);
done:
    Py_XDECREF(payload); Py_XDECREF(chans); Py_XDECREF(free); Py_XDECREF(svc); Py_XDECREF(ch);
    Py_XDECREF(data); Py_XDECREF(slot_obj); Py_XDECREF(got);
    return result;
}

/* ShmMethod(transport, name, codec, dumps, loads, flags, timeout, slice, fallback):
 * dumps None for a raw method; timeout as given by the user (for _resume),
 * slice the wait before each liveness check. */
static PyObject *SM_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *transport, *name, *codec, *dumps, *loads, *flags, *timeout, *fallback;
    double slice;
    if (kw && PyDict_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "ShmMethod takes no keyword arguments"); return NULL; }
    if (!PyArg_ParseTuple(args, "OSOOOO!OdO:ShmMethod", &transport, &name, &codec, &dumps, &loads, &PyLong_Type,
                          &flags, &timeout, &slice, &fallback))
        return NULL;
    if (check_timeout(slice)) return NULL;
    unsigned long f = PyLong_AsUnsignedLong(flags);
    if (f == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (f > UINT32_MAX) { PyErr_SetString(PyExc_ValueError, "flags out of range"); return NULL; }
    if ((dumps != Py_None && !PyCallable_Check(dumps)) || !PyCallable_Check(loads) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "dumps, loads and fallback must be callable");
        return NULL;
    }
    ShmMethod *self = (ShmMethod *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->transport = Py_NewRef(transport); self->name = Py_NewRef(name); self->codec = Py_NewRef(codec);
    self->dumps = Py_NewRef(dumps); self->loads = Py_NewRef(loads); self->flags_obj = Py_NewRef(flags);
    self->timeout = Py_NewRef(timeout); self->fallback = Py_NewRef(fallback);
    self->flags = (uint32_t)f;
    self->slice = slice;
    self->vectorcall = (vectorcallfunc)SM_call;
    return (PyObject *)self;
}

static int SM_traverse(ShmMethod *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict); Py_VISIT(self->transport); Py_VISIT(self->name); Py_VISIT(self->codec);
    Py_VISIT(self->dumps); Py_VISIT(self->loads); Py_VISIT(self->timeout); Py_VISIT(self->fallback);
    Py_VISIT(self->flags_obj);
    return 0;
}

static int SM_clear(ShmMethod *self) {
    Py_CLEAR(self->dict); Py_CLEAR(self->transport); Py_CLEAR(self->name); Py_CLEAR(self->codec);
    Py_CLEAR(self->dumps); Py_CLEAR(self->loads); Py_CLEAR(self->timeout); Py_CLEAR(self->fallback);
    Py_CLEAR(self->flags_obj);
    return 0;
}

static void SM_dealloc(ShmMethod *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    SM_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef SM_getset[] = {{"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL}, {NULL}};

static PyTypeObject ShmMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.ShmMethod",
    .tp_basicsize = sizeof(ShmMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A client's method of a service over shared memory.",
    .tp_new = SM_new,
    .tp_dealloc = (destructor)SM_dealloc,
    .tp_traverse = (traverseproc)SM_traverse,
    .tp_clear = (inquiry)SM_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(ShmMethod, vectorcall),
    .tp_dictoffset = offsetof(ShmMethod, dict),
    .tp_weaklistoffset = offsetof(ShmMethod, weakrefs),
    .tp_getset = SM_getset,
};

/* ---- Gateway: the TCP gateway's usual call, in C ---------------------------
 * A small call crosses the gateway twice per round trip; in Python, checking
 * the frame, taking a channel, posting, building the reply and counting cost
 * about as much as the worker's own share of the call.  This does the usual
 * case in C: one whole call frame at the start of the connection's (empty)
 * parser buffer, uncompressed, not pickle, with room in the gateway and a free
 * channel.  The call is posted straight from the read buffer (the request's
 * one copy) and, when the answer comes while spinning, the reply frame is
 * returned for the connection to write.  Anything else returns None with
 * nothing done, or (channels, channel, outcome) for a call that was posted (or
 * refused by the segment) but not answered at once: Python goes on with it.
 * The frame layout is framing.FRAME ("<BBHIIIQ"): kind, flags, name length,
 * call id, codec flags / status, timeout (ms), payload length. */
#define FRAME_HEADER 24
#define FRAME_CALL 1
#define FRAME_REPLY 2
#define FRAME_MAX_NAME 64

typedef struct {
    PyObject_HEAD
    PyObject *transport, *server, *counters;
    unsigned codec_shift;
    uint64_t refused_codecs;   /* bit n: codec id n goes the long way (Python checks the client may use it) */
    vectorcallfunc vectorcall;
} Gateway;

static PyObject *s_closing, *s_inflight, *s_max_inflight, *s_waiting, *s_end, *s_big, *s_buf, *s_max_payload,
                *k_calls, *k_answered, *k_bytes_in, *k_bytes_out, *k_errors;

/* An int attribute; -1 with an exception set when it is missing or not an int. */
static long long int_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    long long r = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return r;
}

/* A size limit attribute (a non-negative int of any size, clamped to 2**64-1); -1 on error. */
static int size_attr(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    unsigned long long r = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (r == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();   /* above 2**64-1 (no limit, in effect); a negative one never comes from the parser */
    }
    *out = r;
    return 0;
}

static int count(PyObject *counters, PyObject *key, long long add) {
    PyObject *old = PyDict_GetItemWithError(counters, key);   /* borrowed */
    if (!old) return PyErr_Occurred() ? -1 : 0;
    long long v = PyLong_AsLongLong(old);
    if (v == -1 && PyErr_Occurred()) return -1;
    PyObject *new = PyLong_FromLongLong(v + add);
    if (!new) return -1;
    int rc = PyDict_SetItem(counters, key, new);
    Py_DECREF(new);
    return rc;
}

/* The reply frame for a call answered with `status` and `body`. */
static PyObject *reply_frame(uint32_t call_id, uint32_t status, PyObject *body) {
    Py_ssize_t len = PyBytes_GET_SIZE(body);
    PyObject *frame = PyBytes_FromStringAndSize(NULL, FRAME_HEADER + len);
    if (!frame) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
    memset(p, 0, FRAME_HEADER);
    p[0] = FRAME_REPLY;
    uint64_t length = (uint64_t)len;
    memcpy(p + 4, &call_id, 4);        /* little-endian: the project's target is x86-64 / arm64 Linux */
    memcpy(p + 8, &status, 4);
    memcpy(p + 16, &length, 8);
    memcpy(p + FRAME_HEADER, PyBytes_AS_STRING(body), len);
    return frame;
}

static int refused_codec(Gateway *self, uint32_t flags) {
    unsigned codec = (flags >> self->codec_shift) & 0xFF;
    return codec < 64 && (self->refused_codecs >> codec & 1);
}

/* gateway(parser, n); the "server" it was made with is the TCP side's Admission */
static PyObject *GW_call(Gateway *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a Gateway takes (parser, n)");
        return NULL;
    }
    PyObject *parser = args[0];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < FRAME_HEADER) Py_RETURN_NONE;
    /* room in the gateway, nobody waiting for it, and not stopping */
    PyObject *closing = PyObject_GetAttr(self->server, s_closing);
    if (!closing) return NULL;
    int stopping = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (stopping) return stopping < 0 ? NULL : Py_NewRef(Py_None);
    long long inflight = int_attr(self->server, s_inflight), max_inflight;
    if (inflight == -1 && PyErr_Occurred()) return NULL;
    if ((max_inflight = int_attr(self->server, s_max_inflight)) == -1 && PyErr_Occurred()) return NULL;
    if (inflight >= max_inflight) Py_RETURN_NONE;
    PyObject *waiting = PyObject_GetAttr(self->server, s_waiting);
    if (!waiting) return NULL;
    Py_ssize_t nwaiting = PyObject_Length(waiting);
    Py_DECREF(waiting);
    if (nwaiting) return nwaiting < 0 ? NULL : Py_NewRef(Py_None);
    /* the parser holds nothing: the frame starts at its buffer's start */
    long long end = int_attr(parser, s_end);
    uint64_t max_payload;
    if (end == -1 && PyErr_Occurred()) return NULL;
    if (end) Py_RETURN_NONE;
    PyObject *big = PyObject_GetAttr(parser, s_big);
    if (!big) return NULL;
    Py_DECREF(big);
    if (big != Py_None) Py_RETURN_NONE;
    if (size_attr(parser, s_max_payload, &max_payload) < 0) return NULL;
    PyObject *buf_obj = PyObject_GetAttr(parser, s_buf);
    if (!buf_obj) return NULL;
    Py_buffer buf;
    int rc = PyObject_GetBuffer(buf_obj, &buf, PyBUF_SIMPLE);
    Py_DECREF(buf_obj);
    if (rc < 0) return NULL;
    PyObject *chans = NULL, *svc = NULL, *free = NULL, *ch = NULL, *data = NULL, *slot_obj = NULL, *got = NULL,
             *result = NULL;
    if (n > buf.len) goto none;
    const unsigned char *p = buf.buf;
    uint16_t name_len; uint32_t call_id, arg; uint64_t length;
    memcpy(&name_len, p + 2, 2); memcpy(&call_id, p + 4, 4); memcpy(&arg, p + 8, 4); memcpy(&length, p + 16, 8);
    /* (a frame that is not right is left to the parser, which says what is wrong with it) */
    if (p[0] != FRAME_CALL || p[1] || name_len < 1 || name_len > FRAME_MAX_NAME || length > max_payload
        || (uint64_t)n != FRAME_HEADER + name_len + length || refused_codec(self, arg))
        goto none;
    /* a channel, as ShmMethod takes one */
    if (!(chans = PyObject_GetAttr(self->transport, s_channels))) goto done;
    if (chans == Py_None) goto none;
    if (!(svc = PyObject_GetAttr(chans, s_region))) goto done;
    if (!PyObject_TypeCheck(svc, &RegionType)) goto none;
    if (!(free = PyObject_GetAttr(chans, s_free))) goto done;
    if (!PyList_CheckExact(free) || PyList_GET_SIZE(free) == 0) goto none;
    Py_ssize_t last = PyList_GET_SIZE(free) - 1;
    ch = Py_NewRef(PyList_GET_ITEM(free, last));
    if (PyList_SetSlice(free, last, last + 1, NULL) < 0) { Py_CLEAR(ch); goto done; }
    /* from here on the channel is ours: every path gives it back or hands it to Python */
    if (count(self->counters, k_bytes_in, n) < 0) goto abort;
    data = PyObject_GetAttr(ch, s_region);
    slot_obj = data ? PyObject_GetAttr(ch, s_slot) : NULL;
    long slot = slot_obj ? PyLong_AsLong(slot_obj) : -1;
    if (slot == -1 && PyErr_Occurred()) goto abort;
    if (!PyObject_TypeCheck(data, &RegionType) || check_slot((Region *)svc, slot)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "bad channel");
        goto abort;
    }
    Py_buffer name = {.buf = (void *)(p + FRAME_HEADER), .len = name_len};
    Py_buffer payload = {.buf = (void *)(p + FRAME_HEADER + name_len), .len = (Py_ssize_t)length};
    rc = post_call(((Region *)svc)->base, slot, (Region *)data, &name, &payload, arg);
    got = rc > 0 ? PyLong_FromLong(rc) : collect_channel((Region *)svc, slot, (Region *)data, 0.0, rc < 0);
    if (!got || PyErr_CheckSignals() < 0) goto abort;
    uint32_t status = 0;
    PyObject *body = got;
    if (PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 2) {   /* (status, bytes): a small error response */
        unsigned long st = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(got, 0));
        if (st == (unsigned long)-1 && PyErr_Occurred()) goto abort;
        status = (uint32_t)st;
        body = PyTuple_GET_ITEM(got, 1);
    }
    if (!PyBytes_CheckExact(body)) {   /* in flight still, or an answer to read the long way */
        result = PyTuple_Pack(3, chans, ch, got);
        goto done;
    }
    if (!(result = reply_frame(call_id, status, body))) goto abort;
    PyObject *closed = PyObject_GetAttr(chans, s_closed);
    if (!closed || (closed == Py_False && PyList_Append(free, ch) < 0)) {   /* (out of memory) */
        Py_XDECREF(closed);
        Py_CLEAR(result);
        goto abort;   /* which gives the channel back */
    }
    if (closed != Py_False) {   /* closed while the call ran: Python frees the channel */
        PyObject *r = PyObject_CallMethodObjArgs(self->transport, s_give_back, chans, ch, NULL);
        if (r) Py_DECREF(r); else Py_CLEAR(result);
    }
    Py_DECREF(closed);
    if (result && (count(self->counters, k_calls, 1) < 0 || count(self->counters, k_answered, 1) < 0
                   || count(self->counters, k_bytes_out, PyBytes_GET_SIZE(result)) < 0
                   || (status && count(self->counters, k_errors, 1) < 0)))
        Py_CLEAR(result);
    goto done;
abort:   /* an error (a signal handler's exception, most likely) with the channel ours: settle it */
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *r = PyObject_CallMethodObjArgs(self->transport, s_abort, chans, ch, NULL);
        if (r) Py_DECREF(r);
        else PyErr_WriteUnraisable(self->transport);
        PyErr_Restore(type, value, tb);
    }
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&buf);
    Py_XDECREF(chans); Py_XDECREF(svc); Py_XDECREF(free); Py_XDECREF(ch); Py_XDECREF(data); Py_XDECREF(slot_obj);
    Py_XDECREF(got);
    return result;
}

/* Gateway(transport, server, counters, codec_shift, refused_codecs): refused_codecs is a
 * mask, bit n for codec id n (codecs.mask()). */
static PyObject *GW_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *transport, *server, *counters;
    unsigned int shift;
    unsigned long long refused;
    if (kw && PyDict_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "Gateway takes no keyword arguments"); return NULL; }
    if (!PyArg_ParseTuple(args, "OOO!IK:Gateway", &transport, &server, &PyDict_Type, &counters, &shift, &refused))
        return NULL;
    if (shift > 24) { PyErr_SetString(PyExc_ValueError, "codec_shift out of range"); return NULL; }
    Gateway *self = (Gateway *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->transport = Py_NewRef(transport); self->server = Py_NewRef(server); self->counters = Py_NewRef(counters);
    self->codec_shift = shift;
    self->refused_codecs = (uint64_t)refused;
    self->vectorcall = (vectorcallfunc)GW_call;
    return (PyObject *)self;
}

static int GW_traverse(Gateway *self, visitproc visit, void *arg) {
    Py_VISIT(self->transport); Py_VISIT(self->server); Py_VISIT(self->counters);
    return 0;
}

static int GW_clear(Gateway *self) {
    Py_CLEAR(self->transport); Py_CLEAR(self->server); Py_CLEAR(self->counters);
    return 0;
}

static void GW_dealloc(Gateway *self) {
    PyObject_GC_UnTrack(self);
    GW_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject GatewayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.Gateway",
    .tp_basicsize = sizeof(Gateway),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The TCP gateway's usual call: gateway(parser, n) -> reply frame, None or (channels, channel, outcome).",
    .tp_new = GW_new,
    .tp_dealloc = (destructor)GW_dealloc,
    .tp_traverse = (traverseproc)GW_traverse,
    .tp_clear = (inquiry)GW_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Gateway, vectorcall),
};

/* ---- call_alone: a TCP client's call with its connection to itself ---------
 * The TCP client's usual call is one thread's only call on its connection: it
 * sends its frame and reads exactly its reply with one blocking recv().  In
 * Python the bookkeeping around those two system calls (the connection's lock,
 * the reader's turn, the frame checks) costs several times what they do on a
 * small VM; this does that case in C, with the same states and the same lock
 * as tcp_client._Connection.call, and hands everything else back:
 *   - None, with nothing done, when the call is not alone (another call in
 *     flight, someone reading, a broken connection, an idle connection with
 *     something to read, a parser holding part of a frame): call() does it;
 *   - a failed or interrupted send: conn._failed_to_send(call_id, exc);
 *   - whatever came that is not exactly the reply (other frames, part of
 *     one, the end, an error), or nothing within the timeout:
 *     conn._read_on(call_id, n, error, deadline, timeout);
 *   - an exception while reading (a signal handler's): conn._unregister. */
static PyObject *s_lock, *s_send_lock, *s_broken, *s_waiting_c, *s_reading, *s_last_read, *s_parser, *s_sock,
                *s_fileno, *s_acquire, *s_release, *s_get_buffer, *s_idle_check_after, *s_failed_to_send,
                *s_read_on, *s_unregister, *s_pass_reading_on;

static double monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);   /* time.monotonic()'s clock */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int lock_call(PyObject *lock, PyObject *method, PyObject *arg) {   /* 1 acquired/released, 0 not, -1 error */
    PyObject *r = arg ? PyObject_CallMethodOneArg(lock, method, arg) : PyObject_CallMethodNoArgs(lock, method);
    if (!r) return -1;
    int ok = r != Py_False;
    Py_DECREF(r);
    return ok;
}

/* lock.release(), with an exception possibly pending (it stays the one raised). */
static int release_lock(PyObject *lock) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int rc = lock_call(lock, s_release, NULL);
    if (type) { if (rc < 0) PyErr_Clear(); PyErr_Restore(type, value, tb); }
    return rc;
}

static int socket_fd(PyObject *conn) {   /* -1 with an exception set */
    PyObject *sock = PyObject_GetAttr(conn, s_sock);
    if (!sock) return -1;
    PyObject *fd_obj = PyObject_CallMethodNoArgs(sock, s_fileno);
    Py_DECREF(sock);
    if (!fd_obj) return -1;
    long fd = PyLong_AsLong(fd_obj);
    Py_DECREF(fd_obj);
    if (fd == -1 && !PyErr_Occurred()) { errno = EBADF; PyErr_SetFromErrno(PyExc_OSError); }   /* closed */
    return (int)fd;
}

/* The state checks and the claim, under the connection's lock: 1 claimed, 0 not alone, -1 error. */
static int claim_alone(PyObject *conn, PyObject *call_id) {
    PyObject *v = PyObject_GetAttr(conn, s_broken);
    if (!v) return -1;
    Py_DECREF(v);
    if (v != Py_None) return 0;
    if (!(v = PyObject_GetAttr(conn, s_reading))) return -1;
    int reading = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (reading) return reading < 0 ? -1 : 0;
    PyObject *waiting = PyObject_GetAttr(conn, s_waiting_c);
    if (!waiting) return -1;
    if (!PyDict_Check(waiting) || PyDict_GET_SIZE(waiting)) { Py_DECREF(waiting); return 0; }
    PyObject *parser = PyObject_GetAttr(conn, s_parser);
    if (!parser) { Py_DECREF(waiting); return -1; }
    long long end = int_attr(parser, s_end);
    PyObject *big = end == 0 ? PyObject_GetAttr(parser, s_big) : NULL;
    Py_DECREF(parser);
    if (end == -1 && PyErr_Occurred()) { Py_DECREF(waiting); return -1; }
    if (end) { Py_DECREF(waiting); return 0; }
    if (!big) { Py_DECREF(waiting); return -1; }
    Py_DECREF(big);
    if (big != Py_None) { Py_DECREF(waiting); return 0; }
    /* idle for a while: the service may have gone away meanwhile (see IDLE_CHECK_AFTER) */
    double last_read = 0, idle_after = 0;
    if (!(v = PyObject_GetAttr(conn, s_last_read))) { Py_DECREF(waiting); return -1; }
    last_read = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (!(v = PyObject_GetAttr(conn, s_idle_check_after))) { Py_DECREF(waiting); return -1; }
    idle_after = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (PyErr_Occurred()) { Py_DECREF(waiting); return -1; }
    if (monotonic_s() - last_read > idle_after) {
        int fd = socket_fd(conn);
        if (fd < 0) {   /* closed under us: call() finds out, and connects anew */
            Py_DECREF(waiting);
            if (!PyErr_ExceptionMatches(PyExc_OSError)) return -1;
            PyErr_Clear();
            return 0;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN | POLLPRI};
        int rc = poll(&p, 1, 0);
        if (rc != 0) { Py_DECREF(waiting); return 0; }   /* something came (or an error): call() looks */
    }
    int rc = PyObject_SetAttr(conn, s_reading, Py_True);
    if (rc == 0 && PyDict_SetItem(waiting, call_id, Py_None) < 0) {
        PyObject_SetAttr(conn, s_reading, Py_False);
        rc = -1;
    }
    Py_DECREF(waiting);
    return rc < 0 ? -1 : 1;
}

/* A continuation raised: if that happened before its own clean-up could run (an exception
 * from a signal handler at its very start), the call is still registered and the reader's
 * turn still taken, and nobody else would ever end them: end them here, as call() would. */
static void settle_if_registered(PyObject *conn, PyObject *call_id) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *waiting = PyObject_GetAttr(conn, s_waiting_c);
    int still = waiting ? PyDict_Contains(waiting, call_id) : -1;
    Py_XDECREF(waiting);
    if (still) {
        PyErr_Clear();
        PyObject *r = PyObject_CallMethodObjArgs(conn, s_unregister, call_id, Py_True, NULL);
        if (r) Py_DECREF(r); else PyErr_WriteUnraisable(conn);
    }
    PyErr_Restore(type, value, tb);
}

/* Calls conn.<method>(call_id, exc) with the pending exception (which it must raise again or replace). */
static PyObject *hand_error(PyObject *conn, PyObject *method, PyObject *call_id) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb) PyException_SetTraceback(value, tb);
    PyObject *r = PyObject_CallMethodObjArgs(conn, method, call_id, value ? value : Py_None, NULL);
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
    if (r) {   /* it must raise */
        Py_DECREF(r);
        PyErr_SetString(PyExc_RuntimeError, "the connection's error handler returned");
    }
    settle_if_registered(conn, call_id);
    return NULL;
}

static int send_all(PyObject *conn, const char *p, Py_ssize_t left) {   /* 0, or -1 with an exception set */
    while (left > 0) {
        int fd = socket_fd(conn);
        if (fd < 0) return -1;
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = send(fd, p, (size_t)left, MSG_NOSIGNAL);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) { if (PyErr_CheckSignals() < 0) return -1; continue; }
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        p += n; left -= n;
    }
    return 0;
}

/* call_alone(conn, frame, call_id, timeout) -> (status, payload) | None | what conn._read_on returns */
static PyObject *m_call_alone(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "call_alone(conn, frame: bytes, call_id, timeout)");
        return NULL;
    }
    PyObject *conn = args[0], *frame = args[1], *call_id = args[2];
    double timeout = -1;
    if (args[3] != Py_None && ((timeout = PyFloat_AsDouble(args[3])) == -1.0 && PyErr_Occurred())) return NULL;
    if (args[3] != Py_None && !(timeout >= 0)) { PyErr_SetString(PyExc_ValueError, "bad timeout"); return NULL; }
    unsigned long id = PyLong_AsUnsignedLong(call_id);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    PyObject *lock = PyObject_GetAttr(conn, s_lock);
    if (!lock) return NULL;
    int got = lock_call(lock, s_acquire, Py_False);
    if (got <= 0) { Py_DECREF(lock); return got < 0 ? NULL : Py_NewRef(Py_None); }   /* busy: not alone */
    int claimed = claim_alone(conn, call_id);
    if (release_lock(lock) < 0) claimed = -1;   /* (cannot fail: we hold it) */
    if (claimed <= 0) { Py_DECREF(lock); return claimed < 0 ? NULL : Py_NewRef(Py_None); }
    /* the reader's turn is ours and the call is registered: every path below settles both */
    double deadline = timeout >= 0 ? monotonic_s() + timeout : -1;
    PyObject *result = NULL, *send_lock = PyObject_GetAttr(conn, s_send_lock);
    if (!send_lock || lock_call(send_lock, s_acquire, NULL) < 0) {
        Py_XDECREF(send_lock);
        hand_error(conn, s_failed_to_send, call_id);
        goto out;
    }
    int sent = send_all(conn, PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame));
    if (release_lock(send_lock) < 0) sent = -1;
    Py_DECREF(send_lock);
    if (sent < 0) { hand_error(conn, s_failed_to_send, call_id); goto out; }
    /* one read, which usually brings exactly our reply */
    PyObject *parser = PyObject_GetAttr(conn, s_parser), *view = NULL;
    if (!parser) goto interrupted;
    uint64_t max_payload;
    if (size_attr(parser, s_max_payload, &max_payload) < 0
        || !(view = PyObject_CallMethodNoArgs(parser, s_get_buffer))) {
        Py_DECREF(parser);
        goto interrupted;
    }
    Py_DECREF(parser);
    Py_buffer buf;
    if (PyObject_GetBuffer(view, &buf, PyBUF_WRITABLE) < 0) { Py_DECREF(view); goto interrupted; }
    ssize_t n = -1;
    int timed_out = 0, os_error = 0;
    /* a signal that came while sending is handled before a read that may block */
    int signalled = PyErr_CheckSignals() < 0;
    while (!signalled) {
        /* the descriptor is looked up (with the GIL) before each system call, as the socket
         * module does: a socket closed meanwhile gives EBADF, never another socket's bytes */
        int fd = socket_fd(conn);
        if (fd < 0) { os_error = PyErr_ExceptionMatches(PyExc_OSError); break; }
        int flags = 0;
        if (deadline >= 0) {
            double ms = (deadline - monotonic_s()) * 1000;
            struct pollfd p = {.fd = fd, .events = POLLIN | POLLPRI};
            int ready;
            Py_BEGIN_ALLOW_THREADS
            ready = poll(&p, 1, ms <= 0 ? 0 : ms >= INT_MAX ? INT_MAX : (int)ms + ((int)ms < ms));
            Py_END_ALLOW_THREADS
            if (ready == 0) { timed_out = 1; break; }
            if (ready < 0) {
                if (errno == EINTR) { signalled = PyErr_CheckSignals() < 0; continue; }
                PyErr_SetFromErrno(PyExc_OSError);
                os_error = 1;
                break;
            }
            if ((fd = socket_fd(conn)) < 0) { os_error = PyErr_ExceptionMatches(PyExc_OSError); break; }
            flags = MSG_DONTWAIT;   /* readable: it does not block (if it would, poll again) */
        }
        Py_BEGIN_ALLOW_THREADS
        n = recv(fd, buf.buf, (size_t)buf.len, flags);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) { signalled = PyErr_CheckSignals() < 0; continue; }
            if (flags && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
            PyErr_SetFromErrno(PyExc_OSError);
            os_error = 1;
        }
        break;
    }
    if (n < 0 && !timed_out && !os_error) { PyBuffer_Release(&buf); Py_DECREF(view); goto interrupted; }
    PyObject *error = NULL;
    if (os_error) {
        PyObject *type, *tb;
        PyErr_Fetch(&type, &error, &tb);
        PyErr_NormalizeException(&type, &error, &tb);
        Py_XDECREF(type); Py_XDECREF(tb);
    } else if (!timed_out) {
        PyObject *now = PyFloat_FromDouble(monotonic_s());
        if (!now || PyObject_SetAttr(conn, s_last_read, now) < 0) {
            Py_XDECREF(now); PyBuffer_Release(&buf); Py_DECREF(view); goto interrupted;
        }
        Py_DECREF(now);
        const unsigned char *p = buf.buf;
        uint16_t name_len; uint32_t rid, status; uint64_t length;
        if (n >= FRAME_HEADER) {
            memcpy(&name_len, p + 2, 2); memcpy(&rid, p + 4, 4); memcpy(&status, p + 8, 4); memcpy(&length, p + 16, 8);
        }
        if (n >= FRAME_HEADER && p[0] == FRAME_REPLY && !p[1] && !name_len && rid == (uint32_t)id
            && length <= max_payload && (uint64_t)n == FRAME_HEADER + length) {
            PyObject *st = PyLong_FromUnsignedLong(status);
            PyObject *payload = st ? PyBytes_FromStringAndSize((const char *)p + FRAME_HEADER, (Py_ssize_t)length) : NULL;
            PyBuffer_Release(&buf); Py_DECREF(view);
            if (!payload) { Py_XDECREF(st); goto interrupted; }
            result = PyTuple_Pack(2, st, payload);
            Py_DECREF(st); Py_DECREF(payload);
            if (!result) goto interrupted;
            /* our turn as the reader ends; a caller still waiting takes it over */
            if (lock_call(lock, s_acquire, NULL) < 0) { Py_CLEAR(result); goto interrupted; }
            PyObject *waiting = PyObject_GetAttr(conn, s_waiting_c);
            int ok = waiting && PyObject_SetAttr(conn, s_reading, Py_False) == 0 && PyDict_DelItem(waiting, call_id) == 0;
            if (ok && PyDict_GET_SIZE(waiting)) {
                PyObject *r = PyObject_CallMethodNoArgs(conn, s_pass_reading_on);
                ok = r != NULL;
                Py_XDECREF(r);
            }
            Py_XDECREF(waiting);
            release_lock(lock);
            if (!ok) { Py_CLEAR(result); goto interrupted; }   /* (an exception at _pass_reading_on's start) */
            goto out;
        }
    }
    PyBuffer_Release(&buf);
    Py_DECREF(view);
    /* anything else: call() goes on from here */
    {
        PyObject *n_obj = timed_out || os_error ? Py_NewRef(Py_None) : PyLong_FromSsize_t(n);
        PyObject *dl = deadline >= 0 ? PyFloat_FromDouble(deadline) : Py_NewRef(Py_None);
        if (!n_obj || !dl) {
            Py_XDECREF(n_obj); Py_XDECREF(dl); Py_XDECREF(error);
            goto interrupted;
        }
        result = PyObject_CallMethodObjArgs(conn, s_read_on, call_id, n_obj, error ? error : Py_None, dl,
                                            args[3], NULL);
        Py_DECREF(n_obj); Py_DECREF(dl); Py_XDECREF(error);
        if (!result) settle_if_registered(conn, call_id);
    }
    goto out;
interrupted:   /* an exception while the reader's turn is ours: the connection cannot be trusted */
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *r = PyObject_CallMethodObjArgs(conn, s_unregister, call_id, Py_True, NULL);
        if (r) Py_DECREF(r); else PyErr_WriteUnraisable(conn);
        PyErr_Restore(type, value, tb);
    }
out:
    Py_DECREF(lock);
    return result;
}

/* ---- msgpack for the usual small values, in C ------------------------------
 * A service call encodes and decodes twice on each side; msgpack's own pack()
 * and unpackb() cost ~250 ns each on a small VM (a tenth of a shared-memory
 * call), most of it around the few bytes they write.  These do the common
 * values (None, bool, int, float, str, bytes, exact lists, tuples and dicts,
 * nested up to MP_DEPTH) byte for byte as msgpack.Packer(use_bin_type=True)
 * and msgpack.unpackb() with their defaults do, and hand everything else to
 * them (set_msgpack), so unusual values and every error come from msgpack. */
#define MP_DEPTH 32
#define MP_MAX_SIZE ((Py_ssize_t)1 << 40)   /* beyond this (shared references can make it so), msgpack's */
static PyObject *mp_pack_fallback, *mp_unpack_fallback;

/* The encoded size of `o`, or -1: not one of ours (or an error to leave to msgpack). */
static Py_ssize_t mp_size(PyObject *o, int depth) {
    if (o == Py_None || o == Py_True || o == Py_False) return 1;
    if (PyLong_CheckExact(o)) {   /* (msgpack compares a subclass with 0, which may run its code) */
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
        if (overflow) {
            if (overflow < 0) return -1;
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) { PyErr_Clear(); return -1; }
            return 9;
        }
        if (v >= -32 && v < 128) return 1;
        if (v >= -128 && v < 256) return 2;
        if (v >= -32768 && v < 65536) return 3;
        if (v >= -2147483648LL && v < 4294967296LL) return 5;
        return 9;
    }
    if (PyFloat_Check(o)) return 9;
    if (PyBytes_Check(o)) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        return n < 256 ? 2 + n : n < 65536 ? 3 + n : n <= 0xFFFFFFFFLL ? 5 + n : -1;
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        if (!PyUnicode_AsUTF8AndSize(o, &n)) { PyErr_Clear(); return -1; }
        return n < 32 ? 1 + n : n < 256 ? 2 + n : n < 65536 ? 3 + n : n <= 0xFFFFFFFFLL ? 5 + n : -1;
    }
    if (depth >= MP_DEPTH) return -1;
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o), total = n < 16 ? 1 : n < 65536 ? 3 : 5;
        if (n > 0xFFFFFFFFLL) return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t s = mp_size(PySequence_Fast_GET_ITEM(o, i), depth + 1);
            if (s < 0 || (total += s) > MP_MAX_SIZE) return -1;
        }
        return total;
    }
    if (PyDict_CheckExact(o)) {
        Py_ssize_t n = PyDict_GET_SIZE(o), total = n < 16 ? 1 : n < 65536 ? 3 : 5, pos = 0;
        if (n > 0xFFFFFFFFLL) return -1;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v)) {
            Py_ssize_t a = mp_size(k, depth + 1), b = a < 0 ? -1 : mp_size(v, depth + 1);
            if (b < 0 || (total += a + b) > MP_MAX_SIZE) return -1;
        }
        return total;
    }
    return -1;
}

static unsigned char *mp_be(unsigned char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
    return p + n;
}

static unsigned char *mp_len(unsigned char *p, Py_ssize_t n, int fix, unsigned fixbit, unsigned char c8,
                             unsigned char c16, unsigned char c32) {
    if (n < fix) { *p++ = (unsigned char)(fixbit | n); return p; }
    if (c8 && n < 256) { *p++ = c8; *p++ = (unsigned char)n; return p; }
    if (n < 65536) { *p++ = c16; return mp_be(p, (uint64_t)n, 2); }
    *p++ = c32;
    return mp_be(p, (uint64_t)n, 4);
}

/* Writes what mp_size measured (same object, no Python code ran in between). */
static unsigned char *mp_write(PyObject *o, unsigned char *p) {
    if (o == Py_None) { *p++ = 0xc0; return p; }
    if (o == Py_True) { *p++ = 0xc3; return p; }
    if (o == Py_False) { *p++ = 0xc2; return p; }
    if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) { *p++ = 0xcf; return mp_be(p, PyLong_AsUnsignedLongLong(o), 8); }
        if (v < -32) {
            if (v >= -128) { *p++ = 0xd0; return mp_be(p, (uint64_t)v, 1); }
            if (v >= -32768) { *p++ = 0xd1; return mp_be(p, (uint64_t)v, 2); }
            if (v >= -2147483648LL) { *p++ = 0xd2; return mp_be(p, (uint64_t)v, 4); }
            *p++ = 0xd3;
            return mp_be(p, (uint64_t)v, 8);
        }
        if (v < 128) { *p++ = (unsigned char)v; return p; }
        if (v < 256) { *p++ = 0xcc; return mp_be(p, (uint64_t)v, 1); }
        if (v < 65536) { *p++ = 0xcd; return mp_be(p, (uint64_t)v, 2); }
        if (v < 4294967296LL) { *p++ = 0xce; return mp_be(p, (uint64_t)v, 4); }
        *p++ = 0xcf;
        return mp_be(p, (uint64_t)v, 8);
    }
    if (PyFloat_Check(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        *p++ = 0xcb;
        return mp_be(p, bits, 8);
    }
    if (PyBytes_Check(o)) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        p = mp_len(p, n, 0, 0, 0xc4, 0xc5, 0xc6);
        memcpy(p, PyBytes_AS_STRING(o), n);
        return p + n;
    }
    if (PyUnicode_Check(o)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(o, &n);   /* cached by mp_size */
        p = mp_len(p, n, 32, 0xa0, 0xd9, 0xda, 0xdb);
        memcpy(p, s, n);
        return p + n;
    }
    if (PyDict_CheckExact(o)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        p = mp_len(p, PyDict_GET_SIZE(o), 16, 0x80, 0, 0xde, 0xdf);
        while (PyDict_Next(o, &pos, &k, &v)) p = mp_write(v, mp_write(k, p));
        return p;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);   /* an exact list or tuple */
    p = mp_len(p, n, 16, 0x90, 0, 0xdc, 0xdd);
    for (Py_ssize_t i = 0; i < n; i++) p = mp_write(PySequence_Fast_GET_ITEM(o, i), p);
    return p;
}

static PyObject *m_msgpack_dumps(PyObject *mod, PyObject *o) {
    Py_ssize_t size = mp_size(o, 0);
    if (size < 0) {
        if (!mp_pack_fallback) { PyErr_SetString(PyExc_RuntimeError, "set_msgpack() first"); return NULL; }
        PyObject *fallback = Py_NewRef(mp_pack_fallback);   /* set_msgpack may run meanwhile */
        PyObject *r = PyObject_CallOneArg(fallback, o);
        Py_DECREF(fallback);
        return r;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    mp_write(o, (unsigned char *)PyBytes_AS_STRING(out));
    return out;
}

typedef struct { const unsigned char *p, *end; } mp_reader;

static int mp_need(mp_reader *r, Py_ssize_t n) { return r->end - r->p >= n; }

static uint64_t mp_read_be(mp_reader *r, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | r->p[i];
    r->p += n;
    return v;
}

/* The next value; NULL without an exception: not one of ours (or not valid); NULL with one set:
 * out of memory (a list or map being built falls back to msgpack even then). */
static PyObject *mp_read(mp_reader *r, int depth) {
    if (!mp_need(r, 1)) return NULL;
    unsigned c = *r->p++;
    Py_ssize_t n;
    if (c < 0x80) return PyLong_FromLong((long)c);
    if (c >= 0xe0) return PyLong_FromLong((long)(signed char)c);
    if ((c & 0xe0) == 0xa0) { n = c & 0x1f; goto str; }
    if ((c & 0xf0) == 0x90) { n = c & 0x0f; goto array; }
    if ((c & 0xf0) == 0x80) { n = c & 0x0f; goto map; }
    switch (c) {
    case 0xc0: Py_RETURN_NONE;
    case 0xc2: Py_RETURN_FALSE;
    case 0xc3: Py_RETURN_TRUE;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int w = 1 << (c - 0xcc);
        if (!mp_need(r, w)) return NULL;
        return PyLong_FromUnsignedLongLong(mp_read_be(r, w));
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int w = 1 << (c - 0xd0);
        if (!mp_need(r, w)) return NULL;
        uint64_t u = mp_read_be(r, w);
        int64_t v = w == 1 ? (int8_t)u : w == 2 ? (int16_t)u : w == 4 ? (int32_t)u : (int64_t)u;
        return PyLong_FromLongLong(v);
    }
    case 0xca: {
        if (!mp_need(r, 4)) return NULL;
        uint32_t u = (uint32_t)mp_read_be(r, 4);
        float f;
        memcpy(&f, &u, 4);
        return PyFloat_FromDouble(f);
    }
    case 0xcb: {
        if (!mp_need(r, 8)) return NULL;
        uint64_t u = mp_read_be(r, 8);
        double d;
        memcpy(&d, &u, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xd9: case 0xda: case 0xdb: {
        int w = 1 << (c - 0xd9);
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        goto str;
    }
    case 0xc4: case 0xc5: case 0xc6: {
        int w = 1 << (c - 0xc4);
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        if (!mp_need(r, n)) return NULL;
        r->p += n;
        return PyBytes_FromStringAndSize((const char *)r->p - n, n);
    }
    case 0xdc: case 0xdd: {
        int w = c == 0xdc ? 2 : 4;
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        goto array;
    }
    case 0xde: case 0xdf: {
        int w = c == 0xde ? 2 : 4;
        if (!mp_need(r, w)) return NULL;
        n = (Py_ssize_t)mp_read_be(r, w);
        goto map;
    }
    default:
        return NULL;   /* ext, timestamps, the unused byte: msgpack's */
    }
str:
    if (!mp_need(r, n)) return NULL;
    r->p += n;
    {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)r->p - n, n, NULL);
        if (!s) PyErr_Clear();   /* msgpack says what is wrong with it */
        return s;
    }
array:
    if (depth >= MP_DEPTH || !mp_need(r, n)) return NULL;   /* (each item takes a byte at least) */
    {
        PyObject *list = PyList_New(n);
        if (!list) { PyErr_Clear(); return NULL; }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = mp_read(r, depth + 1);
            if (!item) { Py_DECREF(list); return NULL; }
            PyList_SET_ITEM(list, i, item);
        }
        return list;
    }
map:
    if (depth >= MP_DEPTH || !mp_need(r, 2 * n)) return NULL;
    {
        PyObject *dict = PyDict_New();
        if (!dict) { PyErr_Clear(); return NULL; }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *k = mp_read(r, depth + 1), *v = k ? mp_read(r, depth + 1) : NULL;
            /* unpackb's default (strict_map_key) takes str and bytes keys only, and interns str keys */
            if (v && PyUnicode_CheckExact(k)) PyUnicode_InternInPlace(&k);
            int ok = v && (PyUnicode_CheckExact(k) || PyBytes_CheckExact(k)) && PyDict_SetItem(dict, k, v) == 0;
            Py_XDECREF(k); Py_XDECREF(v);
            if (!ok) { PyErr_Clear(); Py_DECREF(dict); return NULL; }
        }
        return dict;
    }
}

static PyObject *m_msgpack_loads(PyObject *mod, PyObject *data) {
    Py_buffer buf;
    if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();   /* not a buffer: msgpack's error */
    } else if (buf.itemsize != 1) {
        PyBuffer_Release(&buf);   /* msgpack refuses multi-byte items: its error */
    } else {
        mp_reader r = {buf.buf, (const unsigned char *)buf.buf + buf.len};
        PyObject *v = mp_read(&r, 0);
        int whole = v && r.p == r.end;
        PyBuffer_Release(&buf);
        if (whole) return v;
        Py_XDECREF(v);
        if (PyErr_Occurred()) return NULL;   /* (only what cannot be left to msgpack, e.g. memory) */
    }
    if (!mp_unpack_fallback) { PyErr_SetString(PyExc_RuntimeError, "set_msgpack() first"); return NULL; }
    PyObject *fallback = Py_NewRef(mp_unpack_fallback);
    PyObject *r = PyObject_CallOneArg(fallback, data);
    Py_DECREF(fallback);
    return r;
}

static PyObject *m_set_msgpack(PyObject *mod, PyObject *args) {
    PyObject *pack, *unpack;
    if (!PyArg_ParseTuple(args, "OO:set_msgpack", &pack, &unpack)) return NULL;
    Py_XSETREF(mp_pack_fallback, Py_NewRef(pack));
    Py_XSETREF(mp_unpack_fallback, Py_NewRef(unpack));
    Py_RETURN_NONE;
}

/* ---- module-level ------------------------------------------------------ */
static PyObject *m_set_spin(PyObject *self, PyObject *arg) {
    double us = PyFloat_AsDouble(arg);
    if (us == -1.0 && PyErr_Occurred()) return NULL;
    if (us < 0 || us > 1e6) { PyErr_SetString(PyExc_ValueError, "spin must be 0..1e6 microseconds"); return NULL; }
    spin_max_ns = (uint64_t)(us * 1000);
    client_spin.budget_ns = worker_spin.budget_ns = spin_max_ns;
    Py_RETURN_NONE;
}

static PyObject *m_get_spin(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(ddd)", spin_max_ns / 1000.0, client_spin.budget_ns / 1000.0, worker_spin.budget_ns / 1000.0);
}

static PyObject *m_set_parent_death_signal(PyObject *self, PyObject *arg) {
    int sig = (int)PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    if (prctl(PR_SET_PDEATHSIG, sig) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* map_fd(fd, size) -> Region owning a MAP_SHARED mapping (the fd may be closed after). */
static PyObject *m_map_fd(PyObject *self, PyObject *args) {
    int fd; Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in", &fd, &size)) return NULL;
    if (size <= 0) { PyErr_SetString(PyExc_ValueError, "size must be positive"); return NULL; }
    void *p;
    Py_BEGIN_ALLOW_THREADS
    p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    Py_END_ALLOW_THREADS
    if (p == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError);
    Region *r = (Region *)RegionType.tp_alloc(&RegionType, 0);
    if (!r) { munmap(p, (size_t)size); return NULL; }
    r->base = p; r->size = size; r->owns = 1; r->exports = 0; r->last_caller_cpu = -1;
    return (PyObject *)r;
}

/* glibc hands large allocations to mmap and gives them back at free, so a
 * process that decodes a 1 MiB payload per call takes hundreds of page faults
 * per call; workers keep such memory in the heap instead. */
static PyObject *m_keep_large_allocations(PyObject *self, PyObject *args) {
    int mmap_threshold, trim_threshold;
    if (!PyArg_ParseTuple(args, "ii", &mmap_threshold, &trim_threshold)) return NULL;
    if (!mallopt(M_MMAP_THRESHOLD, mmap_threshold) || !mallopt(M_TRIM_THRESHOLD, trim_threshold)) {
        PyErr_SetString(PyExc_ValueError, "mallopt refused the thresholds");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"keep_large_allocations", m_keep_large_allocations, METH_VARARGS,
     "mallopt(M_MMAP_THRESHOLD, a); mallopt(M_TRIM_THRESHOLD, b)"},
    {"map_fd", m_map_fd, METH_VARARGS, "map a file descriptor MAP_SHARED; the Region owns the mapping"},
    {"set_spin", m_set_spin, METH_O, "set the longest spin before sleeping, in microseconds (0 disables)"},
    {"get_spin", m_get_spin, METH_NOARGS, "(max, client budget, worker budget) in microseconds"},
    {"msgpack_dumps", m_msgpack_dumps, METH_O, "msgpack.Packer(use_bin_type=True).pack, the usual values in C"},
    {"msgpack_loads", m_msgpack_loads, METH_O, "msgpack.unpackb, the usual values in C"},
    {"set_msgpack", m_set_msgpack, METH_VARARGS, "set_msgpack(pack, unpackb): what takes every other value"},
    {"call_alone", (PyCFunction)(void (*)(void))m_call_alone, METH_FASTCALL,
     "a TCP client's call alone on its connection (see tcp_client._Connection)"},
    {"set_parent_death_signal", m_set_parent_death_signal, METH_O, "prctl(PR_SET_PDEATHSIG)"},
    {NULL}
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_shmcore", NULL, -1, module_methods};

#define ADD(name) if (PyModule_AddIntConstant(m, #name, name) < 0) return NULL
PyMODINIT_FUNC PyInit__shmcore(void) {
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1) ncpu = 1;
    client_spin.budget_ns = worker_spin.budget_ns = spin_max_ns;
    if (PyType_Ready(&RegionType) < 0 || PyType_Ready(&ShmMethodType) < 0 || PyType_Ready(&GatewayType) < 0) return NULL;
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_channels, "_channels"); INTERN(s_free, "free"); INTERN(s_region, "region"); INTERN(s_slot, "slot");
    INTERN(s_closed, "closed"); INTERN(s_resume, "_resume"); INTERN(s_abort, "_abort");
    INTERN(s_give_back, "_give_back"); INTERN(s_call, "call");
    INTERN(s_closing, "closing"); INTERN(s_inflight, "inflight"); INTERN(s_max_inflight, "max_inflight");
    INTERN(s_waiting, "waiting"); INTERN(s_end, "_end"); INTERN(s_big, "_big"); INTERN(s_buf, "_buf");
    INTERN(s_max_payload, "max_payload"); INTERN(k_calls, "calls"); INTERN(k_answered, "answered_inline");
    INTERN(s_lock, "lock"); INTERN(s_send_lock, "send_lock"); INTERN(s_broken, "broken");
    INTERN(s_waiting_c, "waiting"); INTERN(s_reading, "reading"); INTERN(s_last_read, "last_read");
    INTERN(s_parser, "parser"); INTERN(s_sock, "sock"); INTERN(s_fileno, "fileno"); INTERN(s_acquire, "acquire");
    INTERN(s_release, "release"); INTERN(s_get_buffer, "get_buffer"); INTERN(s_idle_check_after, "idle_check_after");
    INTERN(s_failed_to_send, "_failed_to_send"); INTERN(s_read_on, "_read_on"); INTERN(s_unregister, "_unregister");
    INTERN(s_pass_reading_on, "_pass_reading_on");
    INTERN(k_bytes_in, "bytes_in"); INTERN(k_bytes_out, "bytes_out"); INTERN(k_errors, "errors");
    if (!(status_ok = PyLong_FromLong(0))) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) return NULL;
    Py_INCREF(&ShmMethodType);
    if (PyModule_AddObject(m, "ShmMethod", (PyObject *)&ShmMethodType) < 0) return NULL;
    Py_INCREF(&GatewayType);
    if (PyModule_AddObject(m, "Gateway", (PyObject *)&GatewayType) < 0) return NULL;
    ADD(MAGIC); ADD(LAYOUT_VERSION);
    ADD(H_MAGIC); ADD(H_VERSION); ADD(H_MAX_CHANNELS); ADD(H_MAX_WORKERS); ADD(H_MAX_PAYLOAD);
    ADD(H_OWNER_PID); ADD(H_STATE); ADD(H_CREATED_NS); ADD(H_OWNER_START); ADD(H_SEQ);
    ADD(H_SLEEPERS); ADD(H_BITMAP); ADD(H_WORKERS); ADD(H_CHANNELS);
    ADD(W_SIZE); ADD(W_PID); ADD(W_STATE); ADD(W_CALLS); ADD(W_BUSY_NS); ADD(W_STARTED_NS);
    ADD(W_ERRORS); ADD(W_CLAIM_NS);
    ADD(C_SIZE); ADD(C_STATE); ADD(C_OWNER_PID); ADD(C_DATA_GEN); ADD(C_FLAGS); ADD(C_DATA_CAP);
    ADD(C_REQ_LEN); ADD(C_NAME_LEN); ADD(C_STATUS); ADD(C_RESP_OFF); ADD(C_RESP_LEN); ADD(C_OWNER_START); ADD(C_CALLER_CPU); ADD(C_WORKER_CPU);
    ADD(MAX_CHANNELS_LIMIT); ADD(MAX_WORKERS); ADD(MAX_METHODS); ADD(H_STATS_OFF); ADD(H_MAX_METHODS); ADD(H_NAMES_OFF); ADD(NAME_SIZE); ADD(H_OWNER_FLAGS); ADD(OWNER_RESTARTS_WORKERS);
    ADD(OWNER_WORKERS_STARTED); ADD(W_START_TICKS);
    ADD(M_SIZE); ADD(M_CALLS); ADD(M_ERRORS); ADD(M_TOTAL_NS); ADD(M_MAX_NS); ADD(M_BUCKETS); ADD(M_NBUCKETS);
    ADD(SVC_STARTING); ADD(SVC_SERVING); ADD(SVC_STOPPING); ADD(SVC_STOPPED);
    ADD(ST_IDLE); ADD(ST_REQUEST); ADD(ST_CLAIMED); ADD(ST_RESPONSE); ADD(ST_ABANDONED);
    ADD(ST_CODE); ADD(ST_WAITING); ADD(ST_PID_SHIFT);
    return m;
}
