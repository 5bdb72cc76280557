/*
 * The worker's side of a call: claiming posted calls (spin, then sleep),
 * running a method (its common case without a Python frame), publishing the
 * response, and serve(), the loop that does all of it without returning to
 * Python between calls.  The caller's side is in region.c.
 */
#include "core.h"

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

/* A TCP call runs in this worker's process (W_PHASE): claim_phased's answer. */
#define TCP_HERE (-3)

/* Claims a posted call unless a TCP call runs in this process: the phase goes IDLE -> SHM
 * first (publish_reply puts it back), and back to IDLE at once when nothing was claimed.
 * The slot, -1, or TCP_HERE. */
static long claim_phased(Region *self, char *w, uint32_t pid) {
    uint32_t *phase = U32(w, W_PHASE), idle = PHASE_IDLE;
    if (!CAS(phase, &idle, PHASE_SHM)) return TCP_HERE;
    long slot = try_claim(self, pid);
    if (slot < 0) STORE(phase, PHASE_IDLE);
    return slot;
}

/* A TCP call runs in this process and calls are posted: a worker that sleeps gets the wake-up
 * (ours may have been meant for it), then this one sleeps until the TCP call ends (or the
 * deadline).  So a posted call never waits behind a TCP call while another worker sleeps.
 * Returns what the futex wait returned (EINTR: a signal came, which the loop reports). */
static int wait_tcp_call(char *base, char *w, uint64_t deadline) {
    if (LOAD(U32(base, H_SLEEPERS))) {
        __atomic_fetch_add(U32(base, H_SEQ), 1, __ATOMIC_SEQ_CST);
        futex_wake(U32(base, H_SEQ), 1);
    }
    uint32_t *phase = U32(w, W_PHASE), s = LOAD(phase);
    while ((s & PHASE_TCP) && !(s & PHASE_WAITING)) {
        if (CAS(phase, &s, s | PHASE_WAITING)) { s |= PHASE_WAITING; break; }
    }
    uint64_t t = now_ns();
    return (s & PHASE_TCP) && t < deadline ? futex_wait(phase, s, deadline - t) : 0;
}

static int any_posted(char *base) {
    uint32_t n = LOAD(U32(base, H_MAX_CHANNELS)), words = (n + 63) / 64;
    for (uint32_t w = 0; w < words; w++) if (LOAD(U64(base, H_BITMAP + w * 8))) return 1;
    return 0;
}

/* Claiming the next posted call: a spin, then a sleep until the deadline; apart
 * like the caller's wait, so a worker that is its process's only Python thread
 * (the usual case) spins holding the GIL. */

/* A spinner's promise (H_SPIN_UNTIL): calls posted before ``stop`` wake nobody (kick_workers,
 * core.h), counting on the spinner.  The word holds the latest promise.  A spinner that takes
 * a call withdraws its own (if it is still there) and, if more calls are posted, passes a
 * wake-up on (claim_next): they may have come under its promise.  One that runs out of time
 * leaves the promise to expire: it looks at the bitmap once more after its clock passed
 * ``stop`` (claim_sleep), and passes a wake-up on as well if it takes a call and more wait. */
static void promise_spin(char *base, uint64_t stop) {
    uint64_t *until = U64(base, H_SPIN_UNTIL), cur = LOAD(until);
    while (cur < stop && !CAS(until, &cur, stop)) {}
}

static void withdraw_spin(char *base, uint64_t stop) {
    uint64_t expected = stop;
    CAS(U64(base, H_SPIN_UNTIL), &expected, (uint64_t)0);
}

#define WORKER_SPIN_FLOOR_NS 10000

/* The slot claimed at once or while spinning, or -1 when it is time to sleep. */
static long claim_spin(Region *self, char *w, uint32_t pid, uint64_t start, int *spun_ok, int *promised) {
    char *base = self->base;
    long slot = claim_phased(self, w, pid);
    if (slot == TCP_HERE) slot = -1;
    /* the caller we just answered will post its next call soon, unless it
     * needs this CPU to do so: then spinning would only delay it */
    if (slot >= 0 || !worker_spin.budget_ns || self->last_caller_cpu == sched_getcpu()) return slot;
    /* with more runnable threads than CPUs, a caller may need this CPU to post its next call:
     * spin yielding it on every round (not spinning at all costs a futex wake-up per call, ~20 µs
     * here, which with several callers per CPU is most of their time) */
    uint64_t yield_after = system_overloaded(start) ? 0 : YIELD_AFTER_NS;
    uint64_t stop = start + worker_spin.budget_ns, t;
    /* (a promise only matters to callers while a worker sleeps: else they wake nobody anyway,
     * and the word's cache line stays where it is) */
    if ((*promised = LOAD(U32(base, H_SLEEPERS)) > 0)) promise_spin(base, stop);
    for (unsigned i = 1;; i++) {
        if (any_posted(base)) {
            slot = claim_phased(self, w, pid);
            if (slot >= 0) { if (*promised) withdraw_spin(base, stop); *spun_ok = 1; return slot; }
            /* a TCP call runs in this process: no promise it cannot keep (claim_sleep waits) */
            if (slot == TCP_HERE) { if (*promised) withdraw_spin(base, stop); return -1; }
        }
        cpu_relax();
        if ((i & 15) == 0) {
            t = now_ns();
            if (t >= stop) return -1;
            if (t - start >= yield_after) sched_yield();
        }
    }
}

/* The slot, -1 on timeout (or when the service stops with nothing posted),
 * -2 when interrupted.  Without the GIL. */
static long claim_sleep(Region *self, char *w, uint32_t pid, uint64_t deadline) {
    char *base = self->base;
    long slot = -1;
    while (slot < 0) {
        if (LOAD(U32(base, H_STATE)) != SVC_SERVING && !any_posted(base)) break;
        uint32_t seq = LOAD(U32(base, H_SEQ));
        if ((slot = claim_phased(self, w, pid)) >= 0) break;
        if (slot == TCP_HERE) {
            slot = -1;
            if (any_posted(base)) {   /* (else sleep on H_SEQ as usual: a post wakes us) */
                if (wait_tcp_call(base, w, deadline) == EINTR) { slot = -2; break; }   /* (SIGTERM: stop) */
                if (now_ns() >= deadline) break;
                continue;
            }
        }
        __atomic_fetch_add(U32(base, H_SLEEPERS), 1, __ATOMIC_SEQ_CST);
        if (any_posted(base)) {
            __atomic_fetch_sub(U32(base, H_SLEEPERS), 1, __ATOMIC_SEQ_CST);
            continue;
        }
        uint64_t t = now_ns();
        int rc = t < deadline ? futex_wait(U32(base, H_SEQ), seq, deadline - t) : ETIMEDOUT;
        __atomic_fetch_sub(U32(base, H_SLEEPERS), 1, __ATOMIC_SEQ_CST);
        if (rc == EINTR) { slot = -2; break; }
        if (rc == ETIMEDOUT) { if ((slot = claim_phased(self, w, pid)) == TCP_HERE) slot = -1; break; }
    }
    return slot;
}

/* Both phases; returns as claim_sleep.  Called with the GIL. */
static long claim_next(Region *self, char *w, uint64_t deadline) {
    uint32_t pid = LOAD(U32(w, W_PID));
    uint64_t start = now_ns();
    int spun_ok = 0, promised = 0, alone = only_thread();
    long slot = alone ? claim_spin(self, w, pid, start, &spun_ok, &promised) : -1;
    if (slot < 0) {
        Py_BEGIN_ALLOW_THREADS
        if (!alone) slot = claim_spin(self, w, pid, start, &spun_ok, &promised);
        if (slot < 0) slot = claim_sleep(self, w, pid, deadline);
        Py_END_ALLOW_THREADS
    }
    uint64_t t = now_ns();
    /* never quite down to no spin: a worker that sleeps long because a spinning peer took the
     * calls (H_SPIN_UNTIL) would otherwise stop spinning for good, and once every worker has,
     * each call pays a wake-up again */
    spin_adapt(&worker_spin, spun_ok, t - start, WORKER_SPIN_FLOOR_NS);
    if (slot >= 0 && promised && any_posted(self->base)) kick_workers(self->base);
    if (slot >= 0) {
        STORE(U32(w, W_STATE), WORKER_BUSY);
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

static inline int bucket_of(uint64_t ns) {
    uint64_t us = ns / 1000;
    int b = us ? 64 - __builtin_clzll(us) : 0;   /* us < 2^b */
    return b >= M_NBUCKETS ? M_NBUCKETS - 1 : b;
}

/* Counts a call in the per-method statistics of this worker: its time in the method (``ns``)
 * and its wait for a worker before (``wait_ns``). */
static void record_call(char *base, char *w, long method, uint64_t ns, uint64_t wait_ns, uint32_t status) {
    uint32_t stats = LOAD(U32(base, H_STATS_OFF)), nmethods = LOAD(U32(base, H_MAX_METHODS));
    if (method < 0 || (uint32_t)method >= nmethods || !stats) return;
    long widx = (long)((w - (base + H_WORKERS)) / W_SIZE);
    char *m = base + stats + ((uint64_t)widx * nmethods + (uint64_t)method) * M_SIZE;
    __atomic_fetch_add(U64(m, M_CALLS), 1, __ATOMIC_RELAXED);
    if (status) __atomic_fetch_add(U64(m, M_ERRORS), 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(U64(m, M_TOTAL_NS), ns, __ATOMIC_RELAXED);
    if (ns > LOAD(U64(m, M_MAX_NS))) STORE(U64(m, M_MAX_NS), ns);
    __atomic_fetch_add(U64(m, M_BUCKETS + 8 * bucket_of(ns)), 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(U64(m, M_WAIT_NS), wait_ns, __ATOMIC_RELAXED);
    if (wait_ns > LOAD(U64(m, M_WAIT_MAX_NS))) STORE(U64(m, M_WAIT_MAX_NS), wait_ns);
    __atomic_fetch_add(U64(m, M_WAIT_BUCKETS + 8 * bucket_of(wait_ns)), 1, __ATOMIC_RELAXED);
}

/* The call the shared-memory loop claimed is over: the TCP thread may run one here. */
static inline void end_shm_phase(char *w) {
    uint32_t shm = PHASE_SHM;
    CAS(U32(w, W_PHASE), &shm, PHASE_IDLE);
}

/* Writes a response and hands the channel back to its caller.  A payload that
 * already lies inside the data segment (a raw method returning a slice of its
 * argument) is not copied: only its offset is published.  Returns 1 when
 * delivered, 0 when the caller abandoned the call meanwhile, -1 when it does
 * not fit, or is over the service's max_payload (nothing written). */
static int publish_reply(Region *self, char *w, long slot, Region *data, uint32_t status, Py_buffer *payload,
                         long method) {
    char *base = self->base, *ch = base + H_CHANNELS + slot * C_SIZE;
    self->last_caller_cpu = (int)LOAD(U32(ch, C_CALLER_CPU));
    /* read before the response goes: the caller may post its next call at once */
    uint64_t posted = LOAD(U64(ch, C_POSTED_NS));
    uint64_t off = 0, limit = LOAD(U64(base, H_MAX_PAYLOAD));
    char *p = payload->buf;
    /* the channel may hold more than the service's limit (1 MiB as made, doubling as it
     * grows): Python answers PayloadTooLarge instead (an error's own answer, small, goes) */
    if (status == STATUS_OK && limit && (uint64_t)payload->len > limit) return -1;
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
    uint64_t claimed = LOAD(U64(w, W_CLAIM_NS));
    uint64_t t = now_ns(), took = t - claimed;
    uint64_t waited = posted && claimed > posted ? claimed - posted : 0;
    __atomic_fetch_add(U64(w, W_BUSY_NS), took, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(U64(w, W_CALLS), 1, __ATOMIC_SEQ_CST);
    if (status != 0) __atomic_fetch_add(U64(w, W_ERRORS), 1, __ATOMIC_SEQ_CST);
    STORE(U32(w, W_STATE), WORKER_IDLE);
    record_call(base, w, method, took, waited, status);
    end_shm_phase(w);
    return delivered;
}

/* reply(worker_index, slot, data_region, status, payload[, method_index]) -> bool (False: abandoned) */
PyObject *R_reply(Region *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* Runs one method: handler(flags, request) -> (status, payload), or, for a
 * method with a fast path (dispatch.fast_path: fn, loads, dumps, flags,
 * call_failed, encode_failed), the handler's common case without its Python
 * frame.  What the fast path cannot decode goes to the handler, which reports
 * it; what the method raises goes to call_failed, a result dumps refuses to
 * encode_failed.  Without `data` (a TCP call run in the worker's process: gateway.c's
 * LocalWay) the result is not encoded in place. */
static PyObject *status_ok;   /* STATUS_OK, made once (serve_init) */

/* A large result that msgpack's C encoder takes is written straight into the channel's data
 * segment `data` (the request in it is decoded and no longer needed: msgpack's decoders copy)
 * and handed on as a slice of `view`, the segment's read-only view, which publish_reply
 * recognises and does not copy.  NULL (no exception) when it cannot be done that way. */
static PyObject *encode_in_place(PyObject *value, Region *data, PyObject *view) {
    Py_ssize_t size = mp_encoded_size(value);
    if (size < IN_PLACE_MIN || size > data->size) return NULL;
    mp_encode(value, data->base);
    return PySequence_GetSlice(view, 0, size);
}

PyObject *run_method(PyObject *handler, PyObject *fast, uint32_t flags, PyObject *request, Region *data,
                     PyObject *view) {
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
                PyObject *dumps = PyTuple_GET_ITEM(fast, 2);
                PyObject *payload = data && is_c_msgpack_dumps(dumps) ? encode_in_place(value, data, view) : NULL;
                if (!payload && !PyErr_Occurred()) payload = PyObject_CallOneArg(dumps, value);
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
PyObject *R_serve(Region *self, PyObject *const *args, Py_ssize_t nargs) {
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
        /* the call in hand, for a supervisor to name if the call kills us (one plain store) */
        __atomic_store_n(U32(w, W_METHOD), method >= 0 ? (uint32_t)method + 1 : 0u, __ATOMIC_RELAXED);
        Py_INCREF(spec);   /* the cache may drop it while the method runs */
        PyObject *handler = PyTuple_GET_ITEM(spec, 0);
        /* A small request is cheaper to hand over as bytes than as a view; raw
         * methods always get a view, so their argument has one type. */
        PyObject *request = (!PyObject_IsTrue(PyTuple_GET_ITEM(spec, 1)) && req_len - name_len <= SMALL_REQUEST)
            ? PyBytes_FromStringAndSize(data->base + name_len, (Py_ssize_t)(req_len - name_len))
            : PySequence_GetSlice(PyTuple_GET_ITEM(entry, 3), name_len, (Py_ssize_t)req_len);
        PyObject *result = request ? run_method(handler, PyTuple_GET_ITEM(spec, 3), flags, request, data,
                                                 PyTuple_GET_ITEM(entry, 3)) : NULL;
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
                                   : Py_BuildValue("(slkOl)", "reply", slot, (unsigned long)STATUS_ERROR, result, method);
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

/* the mean time of a method's calls above which a TCP call to it is posted, not run in the loop */
#define LOCAL_CALL_MAX_NS 1000000ull

/* The TCP thread's turn (W_PHASE IDLE -> TCP, docs/shm-protocol.md), the entry busy as a claim
 * makes it; 0 when the loop runs or claims a call.  For R_tcp_begin and gateway.c's LocalWay. */
int tcp_phase_begin(char *base, long widx, long method) {
    char *w = base + H_WORKERS + widx * W_SIZE;
    /* A call runs in the TCP thread's loop, which serves this worker's other connections: a
     * method that has been slow here (its mean over this worker's calls) is posted to the pool
     * instead, so that one slow method does not hold up the worker's other clients.  A method
     * this worker has not run yet is judged by the other workers' runs of it, and one no worker
     * has run yet is posted too (its first call must not hold up the worker's other clients
     * for as long as it takes: its time is learned in the pool). */
    uint32_t stats = LOAD(U32(base, H_STATS_OFF)), nmethods = LOAD(U32(base, H_MAX_METHODS));
    if (method >= 0 && (uint32_t)method < nmethods && stats) {
        char *m = base + stats + ((uint64_t)widx * nmethods + (uint64_t)method) * M_SIZE;
        uint64_t calls = LOAD(U64(m, M_CALLS)), total = LOAD(U64(m, M_TOTAL_NS));
        if (!calls) {
            for (uint64_t i = 0; i < MAX_WORKERS; i++) {
                char *o = base + stats + (i * nmethods + (uint64_t)method) * M_SIZE;
                calls += LOAD(U64(o, M_CALLS));
                total += LOAD(U64(o, M_TOTAL_NS));
            }
        }
        if (!calls || total / calls > LOCAL_CALL_MAX_NS) return 0;
    }
    uint32_t idle = PHASE_IDLE;
    if (!CAS(U32(w, W_PHASE), &idle, PHASE_TCP)) return 0;
    STORE(U32(w, W_STATE), WORKER_BUSY);
    STORE(U64(w, W_CLAIM_NS), now_ns());
    __atomic_store_n(U32(w, W_METHOD), method >= 0 ? (uint32_t)method + 1 : 0u, __ATOMIC_RELAXED);
    return 1;
}

/* The TCP call tcp_phase_begin started is answered: counted as a shared-memory call is, the
 * entry idle, the turn given back (and the loop woken if it waits for it). */
void tcp_phase_end(char *base, long widx, long method, uint32_t status) {
    char *w = base + H_WORKERS + widx * W_SIZE;
    uint32_t *phase = U32(w, W_PHASE);
    uint64_t took = now_ns() - LOAD(U64(w, W_CLAIM_NS));
    __atomic_fetch_add(U64(w, W_BUSY_NS), took, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(U64(w, W_CALLS), 1, __ATOMIC_SEQ_CST);
    if (status != 0) __atomic_fetch_add(U64(w, W_ERRORS), 1, __ATOMIC_SEQ_CST);
    STORE(U32(w, W_STATE), WORKER_IDLE);
    record_call(base, w, method, took, 0, status);   /* run at once: no wait for a worker */
    if (__atomic_exchange_n(phase, PHASE_IDLE, __ATOMIC_SEQ_CST) & PHASE_WAITING) futex_wake(phase, 1);
}

/* end_phase(worker_index): a call the loop handed back to Python is settled without a reply
 * (given back, abandoned): the phase the loop took for it goes back to IDLE. */
PyObject *R_end_phase(Region *self, PyObject *arg) {
    long widx = PyLong_AsLong(arg);
    if ((widx == -1 && PyErr_Occurred()) || check_worker(widx)) return NULL;
    char *w = self->base + H_WORKERS + widx * W_SIZE;
    /* only while the phase is still this loop's: once it went back to IDLE (publish_reply), the
     * TCP thread may have begun a call and marked the entry busy, which must stay so.  Only
     * this thread sets SHM, so checking, then storing, then the CAS cannot race with itself. */
    if ((LOAD(U32(w, W_PHASE)) & ~(uint32_t)PHASE_WAITING) == PHASE_SHM) {
        STORE(U32(w, W_STATE), WORKER_IDLE);
        end_shm_phase(w);
    }
    Py_RETURN_NONE;
}

/* tcp_begin(worker_index, method_index) -> bool: the TCP thread takes this process's turn to
 * run a call (W_PHASE IDLE -> TCP) and marks the worker busy as a claim does; False when
 * the shared-memory loop runs (or is claiming) one: the call goes to another worker. */
PyObject *R_tcp_begin(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "tcp_begin takes 2 arguments"); return NULL; }
    long widx = PyLong_AsLong(args[0]), method = PyLong_AsLong(args[1]);
    if (((widx == -1 || method == -1) && PyErr_Occurred()) || check_worker(widx)) return NULL;
    return PyBool_FromLong(tcp_phase_begin(self->base, widx, method));
}

/* tcp_end(worker_index, method_index, status): the TCP call tcp_begin started is answered:
 * counted as a shared-memory call is (the worker's counters, the method's statistics), the
 * worker idle again, and the loop woken if it waits for its turn. */
PyObject *R_tcp_end(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "tcp_end takes 3 arguments"); return NULL; }
    long widx = PyLong_AsLong(args[0]), method = PyLong_AsLong(args[1]);
    unsigned long status = PyLong_AsUnsignedLong(args[2]);
    if (((widx == -1 || method == -1) && PyErr_Occurred()) || check_worker(widx)) return NULL;
    if (status == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if ((LOAD(U32(self->base + H_WORKERS + widx * W_SIZE, W_PHASE)) & PHASE_TCP) == 0) {
        PyErr_SetString(PyExc_RuntimeError, "tcp_end without tcp_begin");
        return NULL;
    }
    tcp_phase_end(self->base, widx, method, (uint32_t)status);
    Py_RETURN_NONE;
}

int serve_init(void) {
    return (status_ok = PyLong_FromLong(STATUS_OK)) ? 0 : -1;
}
