/*
 * The Region type (a writable, 64-byte aligned mapping with atomics and futex
 * operations), the adaptive spin's shared state, and the caller's side of a
 * call: post, the wait for the response (spin, then sleep), collect, call and
 * wait_reply.  The worker's side is in serve.c.
 */
#include "core.h"

#include <fcntl.h>
#include <sys/mman.h>

/* ---- the adaptive spin's state (see core.h) ------------------------------ */
spinner client_spin = {0}, worker_spin = {0};
uint64_t spin_max_ns = 50000;
long ncpu = 1;
static uint64_t load_checked_ns = 0;
static int overloaded = 0;

int system_overloaded(uint64_t now) {
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

/* ---- Region: a writable buffer (an mmap) held for the object's lifetime ---- */
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
    self->gen = GEN_UNKNOWN;
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

/* -- the protocol's hot path: the caller's side --------------------------- */

/* A service segment whose header promises no more than the mapping holds. */
int check_service(Region *self) {
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

int check_slot(Region *self, long slot) {
    if (check_service(self)) return -1;
    uint32_t n = LOAD(U32(self->base, H_MAX_CHANNELS));
    if (slot < 0 || (uint32_t)slot >= n || H_CHANNELS + (slot + 1) * C_SIZE > self->size) {
        PyErr_Format(PyExc_ValueError, "channel %ld out of range", slot);
        return -1;
    }
    return 0;
}

/* Copies name+payload into the data segment and publishes the call.
 * Returns POSTED, CALL_TOO_BIG when it does not fit, CALL_NOT_SERVING when the
 * service is not serving, or POSTED_WOKE when a sleeping worker had to be woken
 * for it. */
int post_call(char *base, long slot, Region *data, Py_buffer *name, Py_buffer *payload, uint32_t flags) {
    Py_ssize_t total = name->len + payload->len;
    int rc = post_check(base, data, name->len, payload->len);
    if (rc) return rc;
    memcpy(data->base, name->buf, name->len);
    if (payload->buf == data->base + name->len) {
        /* written in place already (ShmTransport._place: out-of-band buffers) */
    } else if (payload->len > (1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(data->base + name->len, payload->buf, payload->len);
        Py_END_ALLOW_THREADS
    } else {
        memcpy(data->base + name->len, payload->buf, payload->len);
    }
    return post_publish(base, slot, name->len, total, flags);
}

/* post_call's halves, for a caller that writes the request into the data segment itself
 * (ShmMethod's in-place encoding): 0 when the name and payload may be written there now, else
 * CALL_TOO_BIG or CALL_NOT_SERVING; then, once written, the publication. */
int post_check(char *base, Region *data, Py_ssize_t name_len, Py_ssize_t payload_len) {
    /* over the service's limit: CALL_TOO_BIG too, and the caller's usual way refuses it
     * (PayloadTooLarge) rather than send what the channel, larger than the limit, holds */
    uint64_t limit = LOAD(U64(base, H_MAX_PAYLOAD));
    if (name_len + payload_len > data->size || (limit && (uint64_t)payload_len > limit)) return CALL_TOO_BIG;
    if (LOAD(U32(base, H_STATE)) != SVC_SERVING) return CALL_NOT_SERVING;
    return 0;
}

int post_publish(char *base, long slot, Py_ssize_t name_len, Py_ssize_t total, uint32_t flags) {
    char *ch = base + H_CHANNELS + slot * C_SIZE;
    STORE(U32(ch, C_NAME_LEN), (uint32_t)name_len);
    STORE(U64(ch, C_REQ_LEN), (uint64_t)total);
    STORE(U32(ch, C_FLAGS), flags);
    STORE(U32(ch, C_CALLER_CPU), (uint32_t)sched_getcpu());
    /* one clock read per call: the worker's claim time (which it reads anyway) minus this is
     * the call's wait for a worker */
    STORE(U64(ch, C_POSTED_NS), now_ns());
    STORE(U32(ch, C_STATE), ST_REQUEST);
    uint64_t bit = 1ull << (slot & 63);
    __atomic_fetch_or(U64(base, H_BITMAP + (slot >> 6) * 8), bit, __ATOMIC_SEQ_CST);
    return kick_workers(base) ? POSTED_WOKE : POSTED;
}

/* Waiting for a response: a spin, then a sleep, until the channel holds a
 * response or the timeout passes.  The phases are apart so that a caller that
 * is its process's only Python thread spins holding the GIL: nobody else wants
 * it, and giving it up and taking it back costs ~70 ns, a few percent of a
 * small call.  The sleep always gives it up. */

/* 1 when the response came while spinning, 0 when it is time to sleep. */
static int spin_for_response(char *ch, int woke_worker, uint64_t start) {
    uint32_t *st = U32(ch, C_STATE);
    if ((LOAD(st) & ST_CODE) == ST_RESPONSE) return 1;
    if (!client_spin.budget_ns) return 0;
    int cpu = sched_getcpu();
    /* a worker we just woke may have been put on our CPU, and with more runnable threads than
     * CPUs the worker may wait for ours: let it run at once, and on every round */
    uint64_t yield_after = woke_worker || system_overloaded(start) ? 0 : YIELD_AFTER_NS;
    uint64_t stop = start + client_spin.budget_ns, t;
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

/* 1 when ready, 0 on timeout, -1 when interrupted by a signal.  Without the GIL.
 * Also 0 at once when the call is no longer in flight (a worker gave it back:
 * the caller looks), and, with `look`, whenever WAITING is found clear: it is set
 * again and the caller looks before it sleeps.  Another thread of the caller's
 * process wakes a waiter that way (PendingCall.cancel clears WAITING, then
 * wakes the word): whether the clear comes before the waiter sets the bit,
 * before its futex_wait (EAGAIN) or during it, the waiter returns. */
static int sleep_for_response(char *ch, uint64_t start, uint64_t deadline, int look) {
    uint32_t *st = U32(ch, C_STATE);
    int ready = 0;
    for (;;) {
        uint32_t s = LOAD(st), code = s & ST_CODE;
        if (code == ST_RESPONSE) { ready = 1; break; }
        if (code != ST_REQUEST && code != ST_CLAIMED) break;
        if (!(s & ST_WAITING)) {
            uint32_t e = s;
            if (!CAS(st, &e, s | ST_WAITING)) continue;
            if (look) break;
            s |= ST_WAITING;
        }
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (futex_wait(st, s, deadline - t) == EINTR) { ready = -1; break; }
    }
    spin_adapt(&client_spin, 0, now_ns() - start, 0);
    return ready;
}

/* Both phases; as sleep_for_response.  Called with the GIL. */
static int await_response(char *ch, double timeout, int woke_worker, int look) {
    uint64_t start = now_ns(), deadline = start + (uint64_t)(timeout * 1e9);
    int alone = only_thread(), ready = alone && spin_for_response(ch, woke_worker, start);
    if (!ready) {
        Py_BEGIN_ALLOW_THREADS
        if (!alone) ready = spin_for_response(ch, woke_worker, start);
        if (!ready) ready = sleep_for_response(ch, start, deadline, look);
        Py_END_ALLOW_THREADS
    }
    return ready;
}


static PyObject *response_fields(char *ch) {
    return Py_BuildValue("(kKKk)", (unsigned long)LOAD(U32(ch, C_STATUS)),
                         (unsigned long long)LOAD(U64(ch, C_RESP_OFF)),
                         (unsigned long long)LOAD(U64(ch, C_RESP_LEN)),
                         (unsigned long)LOAD(U32(ch, C_DATA_GEN)));
}

/* wait_reply(slot, timeout) -> (status, resp_off, resp_len, data_gen) or None
 * None means the timeout passed with the call still in flight, or that the
 * caller should look before waiting again (the call is no longer in flight,
 * or WAITING was clear: see sleep_for_response): the caller checks the worker
 * is alive, its own deadline and whether the call was cancelled, then waits
 * again. */
static PyObject *R_wait_reply(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "wait_reply takes 2 arguments"); return NULL; }
    long slot = PyLong_AsLong(args[0]);
    if ((slot == -1 && PyErr_Occurred()) || check_slot(self, slot)) return NULL;
    double timeout = PyFloat_AsDouble(args[1]);
    if ((timeout == -1.0 && PyErr_Occurred()) || check_timeout(timeout)) return NULL;
    char *ch = self->base + H_CHANNELS + slot * C_SIZE;
    int ready = await_response(ch, timeout, 0, 1);
    if (ready < 0 && PyErr_CheckSignals() < 0) return NULL;
    if (ready <= 0) Py_RETURN_NONE;
    return response_fields(ch);
}

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

/* Posts; returns post_call's code, or POST_FAILED with an exception set. */
#define POST_FAILED (-2)
static int post_channel(Region *self, long slot, Region *data, PyObject *name_obj, PyObject *payload_obj,
                        uint32_t flags) {
    Py_buffer name, payload;
    if (PyObject_GetBuffer(name_obj, &name, PyBUF_SIMPLE) < 0) return POST_FAILED;
    if (PyObject_GetBuffer(payload_obj, &payload, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&name); return POST_FAILED; }
    int rc = post_call(self->base, slot, data, &name, &payload, flags);
    PyBuffer_Release(&name);
    PyBuffer_Release(&payload);
    return rc;
}

PyObject *call_channel(Region *self, long slot, Region *data, PyObject *name_obj, PyObject *payload_obj,
                       uint32_t flags, double timeout) {
    int rc = post_channel(self, slot, data, name_obj, payload_obj, flags);
    if (rc == POST_FAILED) return NULL;
    if (rc == CALL_TOO_BIG || rc == CALL_NOT_SERVING) return PyLong_FromLong(rc);
    return collect_channel(self, slot, data, timeout, rc == POSTED_WOKE);
}

/* The response of a posted call, as call() returns it. */
PyObject *collect_channel(Region *self, long slot, Region *data, double timeout, int woke_worker) {
    char *ch = self->base + H_CHANNELS + slot * C_SIZE;
    int ready = await_response(ch, timeout, woke_worker, 0);
    if (ready < 0 && PyErr_CheckSignals() < 0) return NULL;
    if (ready <= 0) return PyLong_FromLong(CALL_PENDING);
    uint64_t off = LOAD(U64(ch, C_RESP_OFF)), len = LOAD(U64(ch, C_RESP_LEN));
    /* Read here only from the segment the answer is in: a worker may have moved the channel
     * to another one, even of the same size (the request's memory stayed with a method that
     * kept part of it), which the caller maps first (CALL_READY: Python follows data_gen). */
    uint32_t gen = LOAD(U32(ch, C_DATA_GEN));
    if (len > SMALL_RESPONSE || (data->gen != GEN_UNKNOWN && gen != data->gen) || off + len > (uint64_t)data->size
        || LOAD(U64(ch, C_DATA_CAP)) != (uint64_t)data->size)
        return PyLong_FromLong(CALL_READY);
    PyObject *body = PyBytes_FromStringAndSize(data->base + off, (Py_ssize_t)len);
    if (!body) return NULL;
    uint32_t st = LOAD(U32(ch, C_STATUS));
    if (st == STATUS_OK) return body;   /* the common case: no tuple to build and take apart */
    PyObject *status = PyLong_FromUnsignedLong(st);
    if (!status) { Py_DECREF(body); return NULL; }
    PyObject *res = PyTuple_Pack(2, status, body);
    Py_DECREF(status); Py_DECREF(body);
    return res;
}

/* post(slot, data_region, name, payload, flags): the first half of call().
 * POSTED, POSTED_WOKE (a sleeping worker was woken for it), CALL_TOO_BIG or
 * CALL_NOT_SERVING (nothing posted): see layout.h. */
static PyObject *R_post(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) { PyErr_SetString(PyExc_TypeError, "post takes 5 arguments"); return NULL; }
    long slot; Region *data; uint32_t flags;
    if (slot_and_data(self, args, &slot, &data) || flags_arg(args[4], &flags)) return NULL;
    int rc = post_channel(self, slot, data, args[2], args[3], flags);
    return rc == POST_FAILED ? NULL : PyLong_FromLong(rc);
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

/* call(slot, data_region, name, payload, flags, timeout): post + wait in one go.
 * Returns the bytes of a small successful response that came back in the same
 * data segment, (status, bytes) for a small error response, else an int:
 * CALL_TOO_BIG (nothing posted), CALL_NOT_SERVING, CALL_PENDING (still in
 * flight at the timeout), CALL_READY (read it with wait_reply). */
static PyObject *R_call(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) { PyErr_SetString(PyExc_TypeError, "call takes 6 arguments"); return NULL; }
    long slot; Region *data; uint32_t flags; double timeout;
    if (slot_and_data(self, args, &slot, &data) || flags_arg(args[4], &flags) || timeout_arg(args[5], &timeout))
        return NULL;
    return call_channel(self, slot, data, args[2], args[3], flags, timeout);
}

/* -- the object ------------------------------------------------------------ */
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
    {"end_phase", (PyCFunction)R_end_phase, METH_O, "a handed-back call settled without a reply: the loop's turn ends"},
    {"tcp_begin", (PyCFunction)(void (*)(void))R_tcp_begin, METH_FASTCALL, "the TCP thread takes the process's turn"},
    {"tcp_end", (PyCFunction)(void (*)(void))R_tcp_end, METH_FASTCALL, "the TCP thread's call ends: counted, turn given back"},
    {"release", (PyCFunction)R_release, METH_NOARGS, "drop the buffer (the region is unusable after)"},
    {"__enter__", (PyCFunction)R_enter, METH_NOARGS, NULL},
    {NULL}
};

static PyObject *Region_get_size(Region *self, void *c) { return PyLong_FromSsize_t(self->size); }
static PyObject *Region_get_gen(Region *self, void *c) { return PyLong_FromUnsignedLong(self->gen); }
static int Region_set_gen(Region *self, PyObject *v, void *c) {
    unsigned long g = v ? PyLong_AsUnsignedLong(v) : (unsigned long)-1;
    if (g == (unsigned long)-1 && (!v || PyErr_Occurred())) {
        if (!v) PyErr_SetString(PyExc_TypeError, "gen cannot be deleted");
        return -1;
    }
    if (g > 0xFFFFFFFFul) { PyErr_SetString(PyExc_OverflowError, "gen is a u32"); return -1; }
    self->gen = (uint32_t)g;
    return 0;
}
static PyGetSetDef Region_getset[] = {
    {"size", (getter)Region_get_size, NULL, "size in bytes", NULL},
    {"gen", (getter)Region_get_gen, (setter)Region_set_gen,
     "a channel data segment's generation (0xFFFFFFFF: not one, or not known)", NULL},
    {NULL}};

PyTypeObject RegionType = {
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
