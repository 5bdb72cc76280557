/*
 * call_alone: a TCP client's call with its connection to itself.
 *
 * The TCP client's usual call is one thread's only call on its connection: it
 * sends its frame and reads exactly its reply with one blocking recv().  In
 * Python the bookkeeping around those two system calls (the connection's lock,
 * the reader's turn, the frame checks) costs several times what they do on a
 * small VM; this does that case in C, with the same states and the same lock
 * as BlockingConnection.call (tcp/client.py), and hands everything else back:
 *   - None, with nothing done, when the call is not alone (another call in
 *     flight, someone reading, a broken connection, an idle connection with
 *     something to read, a parser holding part of a frame): call() does it;
 *   - a failed or interrupted send: conn._failed_to_send(call_id, exc);
 *   - whatever came that is not exactly the reply (other frames, part of
 *     one, the end, an error), or nothing within the timeout:
 *     conn._read_on(call_id, n, error, deadline, timeout);
 *   - an exception while reading (a signal handler's): conn._unregister.
 */
#include "core.h"

#include <poll.h>
#include <pthread.h>
/* structmember.h's member types include a T_SHORT, as layout.h's service header does (a field
 * this file does not use): the member type's is the one meant here */
#undef T_SHORT
#include <structmember.h>
#include <sys/socket.h>

/*
 * ConnectionCore: the state of a blocking client's connection that call_alone shares with
 * BlockingConnection (tcp/client.py), which is its subclass.  Python reads and writes these
 * as attributes (member descriptors); C reads the fields, without a lookup by name.  The
 * objects are set by BlockingConnection.__init__ and only `broken` is replaced later.
 */
typedef struct {
    PyObject_HEAD
    PyObject *sock, *parser, *lock, *send_lock, *waiting, *broken;
    /* the locks' bound acquire and release (set with them: see CC_set_lock) */
    PyObject *lock_acquire, *lock_release, *send_acquire, *send_release;
    double last_read;          /* when bytes last came (time.monotonic()); 0: check before the first call */
    double idle_check_after;   /* see client.IDLE_CHECK_AFTER */
    Py_ssize_t alone_limit;    /* a frame call_alone may send is shorter */
    unsigned long fork_generation;   /* fork_generation() when the connection was made */
    char reading, alone;
    char retired;              /* taken out of use: closed when its last call ends */
} ConnectionCore;

static ConnectionCore *core_of(PyObject *conn) {   /* NULL with an exception set */
    if (PyObject_TypeCheck(conn, &ConnectionCoreType)) return (ConnectionCore *)conn;
    PyErr_SetString(PyExc_TypeError, "call_alone takes a ConnectionCore");
    return NULL;
}

static double monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);   /* time.monotonic()'s clock */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* a lock's bound acquire (with `arg`: its blocking flag) or release: 1 acquired/released, 0 not, -1 error */
static int lock_call(PyObject *method, PyObject *arg) {
    PyObject *r = arg ? PyObject_CallOneArg(method, arg) : PyObject_CallNoArgs(method);
    if (!r) return -1;
    int ok = r != Py_False;
    Py_DECREF(r);
    return ok;
}

/* lock.release(), with an exception possibly pending (it stays the one raised). */
static int release_lock(PyObject *release) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int rc = lock_call(release, NULL);
    if (type) { if (rc < 0) PyErr_Clear(); PyErr_Restore(type, value, tb); }
    return rc;
}

static int socket_fd(PyObject *conn) {   /* -1 with an exception set */
    PyObject *sock = Py_XNewRef(((ConnectionCore *)conn)->sock);
    if (!sock) { PyErr_SetString(PyExc_AttributeError, "sock"); return -1; }
    PyObject *fd_obj = PyObject_CallMethodNoArgs(sock, s_fileno);
    Py_DECREF(sock);
    if (!fd_obj) return -1;
    long fd = PyLong_AsLong(fd_obj);
    Py_DECREF(fd_obj);
    if (fd == -1 && !PyErr_Occurred()) { errno = EBADF; PyErr_SetFromErrno(PyExc_OSError); }   /* closed */
    return (int)fd;
}

/* The state checks and the claim, under the connection's lock: 1 claimed, 0 not alone, -1 error. */
static int claim_alone(PyObject *conn, PyObject *call_id, double now) {
    ConnectionCore *c = (ConnectionCore *)conn;
    if ((c->broken && c->broken != Py_None) || c->reading) return 0;
    PyObject *waiting = Py_XNewRef(c->waiting), *parser = Py_XNewRef(c->parser);
    if (!waiting || !parser) {
        Py_XDECREF(waiting); Py_XDECREF(parser);
        PyErr_SetString(PyExc_AttributeError, "waiting, parser");
        return -1;
    }
    if (!PyDict_Check(waiting) || PyDict_GET_SIZE(waiting)) { Py_DECREF(waiting); Py_DECREF(parser); return 0; }
    long long end = int_attr(parser, s_end);
    PyObject *big = end == 0 ? PyObject_GetAttr(parser, s_big) : NULL;
    Py_DECREF(parser);
    if (end == -1 && PyErr_Occurred()) { Py_DECREF(waiting); return -1; }
    if (end) { Py_DECREF(waiting); return 0; }
    if (!big) { Py_DECREF(waiting); return -1; }
    Py_DECREF(big);
    if (big != Py_None) { Py_DECREF(waiting); return 0; }
    /* idle for a while: the service may have gone away meanwhile (see IDLE_CHECK_AFTER) */
    if (now - c->last_read > c->idle_check_after) {
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
    int rc = PyDict_SetItem(waiting, call_id, Py_None);
    if (rc == 0) c->reading = 1;
    Py_DECREF(waiting);
    return rc < 0 ? -1 : 1;
}

/* An exception (a signal handler's, most likely) while the reader's turn is ours: the
 * connection cannot be trusted.  conn._unregister(call_id, True) ends the turn, forgets the
 * call and drops the connection, as call() would; the exception stays the one raised. */
static void end_turn_on_error(PyObject *conn, PyObject *call_id) {
    call_keeping_error(conn, s_unregister, call_id, Py_True);
}

/* A continuation raised: if that happened before its own clean-up could run (an exception
 * from a signal handler at its very start), the call is still registered and the reader's
 * turn still taken, and nobody else would ever end them: end them here, as call() would. */
static void settle_if_registered(PyObject *conn, PyObject *call_id) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *waiting = Py_XNewRef(((ConnectionCore *)conn)->waiting);
    int still = waiting ? PyDict_Contains(waiting, call_id) : -1;   /* (-1: cannot tell, so end them) */
    Py_XDECREF(waiting);
    PyErr_Restore(type, value, tb);   /* (what the check raised, if anything, is dropped) */
    if (still) end_turn_on_error(conn, call_id);
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

/* The call's frame (bytes) sent and its reply read on `conn`, alone: (status, payload) | None
 * (not alone: nothing done) | what conn._read_on returns.  timeout_obj: None or seconds, from
 * `began` (monotonic_s() when the call began: one clock read per call). */
static PyObject *call_alone_on(PyObject *conn, PyObject *frame, PyObject *call_id, PyObject *timeout_obj,
                               double began) {
    double timeout = -1;
    if (timeout_obj != Py_None && ((timeout = PyFloat_AsDouble(timeout_obj)) == -1.0 && PyErr_Occurred())) return NULL;
    if (timeout_obj != Py_None && !(timeout >= 0)) { PyErr_SetString(PyExc_ValueError, "bad timeout"); return NULL; }
    ConnectionCore *c = core_of(conn);
    if (!c) return NULL;
    unsigned long id = PyLong_AsUnsignedLong(call_id);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (!c->lock_acquire || !c->send_acquire) { PyErr_SetString(PyExc_AttributeError, "lock, send_lock"); return NULL; }
    PyObject *acquire = Py_NewRef(c->lock_acquire), *release = Py_NewRef(c->lock_release);
    int got = lock_call(acquire, Py_False);
    if (got <= 0) { Py_DECREF(acquire); Py_DECREF(release); return got < 0 ? NULL : Py_NewRef(Py_None); }   /* busy: not alone */
    int claimed = claim_alone(conn, call_id, began);
    if (release_lock(release) < 0) claimed = -1;   /* (cannot fail: we hold it) */
    if (claimed <= 0) { Py_DECREF(acquire); Py_DECREF(release); return claimed < 0 ? NULL : Py_NewRef(Py_None); }
    /* the reader's turn is ours and the call is registered: every path below settles both */
    double deadline = timeout >= 0 ? began + timeout : -1;
    PyObject *result = NULL, *send_acquire = Py_NewRef(c->send_acquire), *send_release = Py_NewRef(c->send_release);
    if (lock_call(send_acquire, NULL) < 0) {
        Py_DECREF(send_acquire); Py_DECREF(send_release);
        hand_error(conn, s_failed_to_send, call_id);
        goto out;
    }
    int sent = send_all(conn, PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame));
    if (release_lock(send_release) < 0) sent = -1;
    Py_DECREF(send_acquire); Py_DECREF(send_release);
    if (sent < 0) { hand_error(conn, s_failed_to_send, call_id); goto out; }
    /* one read, which usually brings exactly our reply */
    PyObject *parser = Py_XNewRef(c->parser), *view = NULL;
    if (!parser) { PyErr_SetString(PyExc_AttributeError, "parser"); goto interrupted; }
    uint64_t max_payload;
    /* the reply is read into the parser's whole scratch buffer: claim_alone found it empty (its
     * _end 0, no large frame), and only the reader, which we are, changes that */
    if (size_attr(parser, s_max_payload, &max_payload) < 0 || !(view = PyObject_GetAttr(parser, s_buf))) {
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
        c->last_read = monotonic_s();
        const unsigned char *p = buf.buf;
        uint16_t name_len; uint32_t rid, status; uint64_t length;
        if (n >= FRAME_HEADER) {
            memcpy(&name_len, p + FRAME_NAME_LEN, 2); memcpy(&rid, p + FRAME_CALL_ID, 4);
            memcpy(&status, p + FRAME_ARG, 4); memcpy(&length, p + FRAME_LENGTH, 8);
        }
        if (n >= FRAME_HEADER && p[FRAME_KIND] == FRAME_REPLY && !p[FRAME_FLAGS] && !name_len && rid == (uint32_t)id
            && length <= max_payload && (uint64_t)n == FRAME_HEADER + length) {
            PyObject *st = PyLong_FromUnsignedLong(status);
            PyObject *payload = st ? PyBytes_FromStringAndSize((const char *)p + FRAME_HEADER, (Py_ssize_t)length) : NULL;
            PyBuffer_Release(&buf); Py_DECREF(view);
            if (!payload) { Py_XDECREF(st); goto interrupted; }
            result = PyTuple_Pack(2, st, payload);
            Py_DECREF(st); Py_DECREF(payload);
            if (!result) goto interrupted;
            /* our turn as the reader ends; a caller still waiting takes it over */
            if (lock_call(acquire, NULL) < 0) { Py_CLEAR(result); goto interrupted; }
            PyObject *waiting = Py_XNewRef(c->waiting);
            c->reading = 0;
            int ok = waiting && PyDict_DelItem(waiting, call_id) == 0;
            if (ok && PyDict_GET_SIZE(waiting)) {
                PyObject *r = PyObject_CallMethodNoArgs(conn, s_pass_reading_on);
                ok = r != NULL;
                Py_XDECREF(r);
            }
            /* a retired connection closes once its last call is over (as call() and _unregister do) */
            int last = ok && c->retired && PyDict_GET_SIZE(waiting) == 0;
            Py_XDECREF(waiting);
            release_lock(release);
            if (!ok) { Py_CLEAR(result); goto interrupted; }   /* (an exception at _pass_reading_on's start) */
            if (last) {
                PyObject *r = PyObject_CallMethodNoArgs(conn, s_close);
                if (!r) Py_CLEAR(result);   /* (close() catches OSError: only a signal handler's exception) */
                Py_XDECREF(r);
            }
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
                                            timeout_obj, NULL);
        Py_DECREF(n_obj); Py_DECREF(dl); Py_XDECREF(error);
        if (!result) settle_if_registered(conn, call_id);
    }
    goto out;
interrupted:   /* an exception while the reader's turn is ours: the connection cannot be trusted */
    end_turn_on_error(conn, call_id);
out:
    Py_DECREF(acquire); Py_DECREF(release);
    return result;
}

/* call_alone(conn, frame, call_id, timeout) -> (status, payload) | None | what conn._read_on returns */
PyObject *m_call_alone(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "call_alone(conn, frame: bytes, call_id, timeout)");
        return NULL;
    }
    return call_alone_on(args[0], args[1], args[2], args[3], monotonic_s());
}

/* Call ids, for every TCP client of the process (the blocking one's, in Python and here, and
 * the asyncio one's): 1..2**32-1 then round again, never 0.  Under the GIL. */
static uint32_t last_call_id;

static uint32_t take_call_id(void) {
    if (++last_call_id == 0) last_call_id = 1;
    return last_call_id;
}

PyObject *m_next_call_id(PyObject *mod, PyObject *unused) {
    return PyLong_FromUnsignedLong(take_call_id());
}

/* Bumped in a child process after fork(): a connection made before belongs to the parent
 * (cheaper than comparing getpid(), a system call, on every call). */
static unsigned long fork_generation;

static void forked_child(void) { fork_generation++; }

PyObject *m_fork_generation(PyObject *mod, PyObject *unused) {
    return PyLong_FromUnsignedLong(fork_generation);
}

int call_alone_init(void) {
    return pthread_atfork(NULL, NULL, forked_child) == 0 ? 0 : -1;
}

/*
 * TcpMethod: the blocking TCP client's generated method, the usual call in C.
 *
 * Above call_alone, a generated method in Python costs eight Python frames
 * (the method, the transport's call and _call, the call id, the header, the
 * timeout, the answer and its decoding): on a small VM about a tenth of the
 * client's share of a small call under load.  This encodes the arguments
 * (as ShmMethod does), takes the connection's usual call (usual_call) and
 * decodes a successful reply with codec.loads_fast, and leaves everything
 * else to Python: `fallback` for keyword arguments or arguments the codec
 * refuses, transport.call when there is no connection to take the call alone
 * (none yet, another call on it, made before a fork, a frame too large),
 * transport._after_alone for an exception (a call the server never started is
 * sent again from there, as call() does), and `answer` for a reply that is not
 * a success loads_fast takes (an error raised, or a clear DecodeError).
 */
typedef struct {
    PyObject_HEAD
    PyObject *dict, *weakrefs;
    PyObject *transport, *name, *codec, *dumps, *loads, *answer, *timeout, *fallback, *flags_obj;
    uint32_t flags, timeout_ms;
    int c_msgpack;   /* dumps is msgpack's C encoder */
    vectorcallfunc vectorcall;
} TcpMethod;

/* A call sent on the transport's connection, alone (its frame built here, from the method's
 * name, codec flags and timeout): 1 with *got set (or NULL and an exception), 0 when the
 * connection cannot take it so (none yet, made before a fork, TLS, a frame too large): nothing
 * sent.  TcpMethod's usual call, and TcpTransport._call's (through call_usual). */
static int usual_call(PyObject *transport, PyObject *name, uint32_t flags, uint32_t timeout_ms, PyObject *timeout,
                      PyObject *payload, double began, PyObject **got) {
    *got = NULL;
    PyObject *conn = PyObject_GetAttr(transport, s_conn);
    if (!conn) return 1;
    int usual = 0;
    if (conn != Py_None) {
        ConnectionCore *c = core_of(conn);
        if (!c) { Py_DECREF(conn); return 1; }
        usual = c->alone && c->fork_generation == fork_generation && PyBytes_GET_SIZE(payload) < c->alone_limit;
    }
    if (!usual) { Py_DECREF(conn); return 0; }
    Py_ssize_t name_len = PyBytes_GET_SIZE(name), len = PyBytes_GET_SIZE(payload);
    uint32_t id = take_call_id();
    PyObject *call_id = PyLong_FromUnsignedLong(id);
    PyObject *frame = call_id ? PyBytes_FromStringAndSize(NULL, FRAME_HEADER + name_len + len) : NULL;
    if (!frame) { Py_XDECREF(call_id); Py_DECREF(conn); return 1; }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
    uint16_t nl = (uint16_t)name_len;
    uint64_t length = (uint64_t)len;
    p[FRAME_KIND] = FRAME_CALL;
    p[FRAME_FLAGS] = 0;
    memcpy(p + FRAME_NAME_LEN, &nl, 2);   /* little-endian, as framing.FRAME packs it (layout.h) */
    memcpy(p + FRAME_CALL_ID, &id, 4);
    memcpy(p + FRAME_ARG, &flags, 4);
    memcpy(p + FRAME_TIMEOUT, &timeout_ms, 4);
    memcpy(p + FRAME_LENGTH, &length, 8);
    memcpy(p + FRAME_HEADER, PyBytes_AS_STRING(name), (size_t)name_len);
    memcpy(p + FRAME_HEADER + name_len, PyBytes_AS_STRING(payload), (size_t)len);
    *got = call_alone_on(conn, frame, call_id, timeout, began);
    Py_DECREF(frame); Py_DECREF(call_id); Py_DECREF(conn);
    if (*got == Py_None) { Py_CLEAR(*got); return 0; }
    return 1;
}

/* call_usual(transport, name, flags, timeout, timeout_ms, payload) -> (status, payload) | None
 * (not taken: nothing sent) | what conn._read_on returns: TcpTransport._call's usual call */
PyObject *m_call_usual(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyBytes_Check(args[1]) || !PyBytes_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "call_usual(transport, name: bytes, flags, timeout, timeout_ms, payload: bytes)");
        return NULL;
    }
    Py_ssize_t name_len = PyBytes_GET_SIZE(args[1]);
    unsigned long flags = PyLong_AsUnsignedLong(args[2]), timeout_ms = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (name_len < 1 || name_len > FRAME_MAX_NAME || flags > 0xFFFFFFFFul || timeout_ms > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "a method's name is 1 to 64 bytes; flags and timeout_ms are 32-bit");
        return NULL;
    }
    PyObject *got;
    if (!usual_call(args[0], args[1], (uint32_t)flags, (uint32_t)timeout_ms, args[3], args[5], monotonic_s(), &got))
        Py_RETURN_NONE;
    return got;
}

static PyObject *TM_call(TcpMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (kwnames && PyTuple_GET_SIZE(kwnames)) return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    PyObject *payload;
    if (self->dumps == Py_None) {   /* raw: the one bytes argument is the payload */
        if (n != 1 || !PyBytes_CheckExact(args[0])) return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
        payload = Py_NewRef(args[0]);
    } else {
        PyObject *tuple = PyTuple_New(n);
        if (!tuple) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
        payload = encode_tuple(self->dumps, tuple, self->c_msgpack ? mp_encoded_size(tuple) : -1);
        Py_DECREF(tuple);
    }
    if (!payload) {
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
        PyErr_Clear();   /* the fallback encodes again and raises a clear error */
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    }
    PyObject *got = NULL, *result = NULL;
    double began = monotonic_s();
    if (!PyBytes_CheckExact(payload)
        || !usual_call(self->transport, self->name, self->flags, self->timeout_ms, self->timeout, payload, began, &got)) {
        result = PyObject_CallMethodObjArgs(self->transport, s_tcp_call, self->name, payload, self->flags_obj,
                                            self->codec, self->timeout, NULL);
        goto done;
    }
    if (got) {
        if (PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 2 && PyLong_CheckExact(PyTuple_GET_ITEM(got, 0))
            && PyLong_AsLong(PyTuple_GET_ITEM(got, 0)) == 0 && PyBytes_CheckExact(PyTuple_GET_ITEM(got, 1))) {
            result = PyObject_CallOneArg(self->loads, PyTuple_GET_ITEM(got, 1));
            if (result || !PyErr_ExceptionMatches(PyExc_Exception)) goto done;
            PyErr_Clear();   /* answer() decodes it again and says what is wrong */
        }
        result = PyObject_CallFunctionObjArgs(self->answer, got, self->codec, self->name, NULL);
    }
    if (!result && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* as call() does: a call the server never started (the error says so) is sent again */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb) PyException_SetTraceback(value, tb);
        PyObject *b = PyFloat_FromDouble(began);
        if (b) result = PyObject_CallMethodObjArgs(self->transport, s_after_alone, value, b, self->name, payload,
                                                   self->flags_obj, self->codec, self->timeout, NULL);
        if (!result && value) {   /* another error than the first: that one is its context, as in call()'s except */
            PyObject *t2, *v2, *tb2;
            PyErr_Fetch(&t2, &v2, &tb2);
            PyErr_NormalizeException(&t2, &v2, &tb2);
            if (tb2) PyException_SetTraceback(v2, tb2);
            if (v2 && v2 != value) {
                PyObject *ctx = PyException_GetContext(v2);
                if (!ctx) PyException_SetContext(v2, Py_NewRef(value));
                Py_XDECREF(ctx);
            }
            PyErr_Restore(t2, v2, tb2);
        }
        Py_XDECREF(b); Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
    }
done:
    Py_DECREF(payload);
    Py_XDECREF(got);
    return result;
}

/* TcpMethod(transport, name, codec, dumps, loads, flags, timeout, timeout_ms, fallback, answer):
 * dumps None for a raw method; timeout as given by the user, timeout_ms as the frame carries it */
static PyObject *TM_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *transport, *name, *codec, *dumps, *loads, *flags, *timeout, *timeout_ms_obj, *fallback, *answer;
    if (kw && PyDict_GET_SIZE(kw)) { PyErr_SetString(PyExc_TypeError, "TcpMethod takes no keyword arguments"); return NULL; }
    if (!PyArg_ParseTuple(args, "OSOOOO!OO!OO:TcpMethod", &transport, &name, &codec, &dumps, &loads, &PyLong_Type,
                          &flags, &timeout, &PyLong_Type, &timeout_ms_obj, &fallback, &answer))
        return NULL;
    if ((dumps != Py_None && !PyCallable_Check(dumps)) || !PyCallable_Check(loads) || !PyCallable_Check(fallback)
        || !PyCallable_Check(answer)) {
        PyErr_SetString(PyExc_TypeError, "dumps, loads, fallback and answer must be callable");
        return NULL;
    }
    if (PyBytes_GET_SIZE(name) < 1 || PyBytes_GET_SIZE(name) > FRAME_MAX_NAME) {
        PyErr_SetString(PyExc_ValueError, "a method's name is 1 to 64 bytes");
        return NULL;
    }
    unsigned long f = PyLong_AsUnsignedLong(flags), timeout_ms = PyLong_AsUnsignedLong(timeout_ms_obj);
    if (PyErr_Occurred()) return NULL;
    if (f > 0xFFFFFFFFul || timeout_ms > 0xFFFFFFFFul) {   /* (the frame's fields are 32-bit) */
        PyErr_SetString(PyExc_OverflowError, "flags and timeout_ms are 32-bit");
        return NULL;
    }
    TcpMethod *self = (TcpMethod *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->transport = Py_NewRef(transport); self->name = Py_NewRef(name); self->codec = Py_NewRef(codec);
    self->dumps = Py_NewRef(dumps); self->loads = Py_NewRef(loads); self->flags_obj = Py_NewRef(flags);
    self->timeout = Py_NewRef(timeout); self->fallback = Py_NewRef(fallback); self->answer = Py_NewRef(answer);
    self->flags = (uint32_t)f;
    self->timeout_ms = (uint32_t)timeout_ms;
    self->c_msgpack = dumps != Py_None && is_c_msgpack_dumps(dumps);
    self->vectorcall = (vectorcallfunc)TM_call;
    return (PyObject *)self;
}

static int TM_traverse(TcpMethod *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict); Py_VISIT(self->transport); Py_VISIT(self->name); Py_VISIT(self->codec); Py_VISIT(self->dumps);
    Py_VISIT(self->loads); Py_VISIT(self->answer); Py_VISIT(self->timeout); Py_VISIT(self->fallback);
    Py_VISIT(self->flags_obj);
    return 0;
}

static int TM_clear(TcpMethod *self) {
    Py_CLEAR(self->dict); Py_CLEAR(self->transport); Py_CLEAR(self->name); Py_CLEAR(self->codec); Py_CLEAR(self->dumps);
    Py_CLEAR(self->loads); Py_CLEAR(self->answer); Py_CLEAR(self->timeout); Py_CLEAR(self->fallback);
    Py_CLEAR(self->flags_obj);
    return 0;
}

static void TM_dealloc(TcpMethod *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    TM_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef TM_getset[] = {{"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL}, {NULL}};

PyTypeObject TcpMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.TcpMethod",
    .tp_basicsize = sizeof(TcpMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A client's method of a service over TCP.",
    .tp_new = TM_new,
    .tp_dealloc = (destructor)TM_dealloc,
    .tp_traverse = (traverseproc)TM_traverse,
    .tp_clear = (inquiry)TM_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TcpMethod, vectorcall),
    .tp_dictoffset = offsetof(TcpMethod, dict),
    .tp_weaklistoffset = offsetof(TcpMethod, weakrefs),
    .tp_getset = TM_getset,
};

/* lock and send_lock: a lock set here comes with its bound acquire and release, which C calls
 * (no method lookup per call) */
static int CC_set_lock(ConnectionCore *self, PyObject *value, void *which) {
    if (!value) { PyErr_SetString(PyExc_AttributeError, "a connection's locks cannot be deleted"); return -1; }
    PyObject *acquire = PyObject_GetAttr(value, s_acquire), *release = acquire ? PyObject_GetAttr(value, s_release) : NULL;
    if (!release) { Py_XDECREF(acquire); return -1; }
    int send = which != NULL;
    PyObject **lock = send ? &self->send_lock : &self->lock;
    PyObject **acq = send ? &self->send_acquire : &self->lock_acquire, **rel = send ? &self->send_release : &self->lock_release;
    Py_XSETREF(*lock, Py_NewRef(value));
    Py_XSETREF(*acq, acquire);
    Py_XSETREF(*rel, release);
    return 0;
}

static PyObject *CC_get_lock(ConnectionCore *self, void *which) {
    PyObject *lock = which ? self->send_lock : self->lock;
    if (!lock) { PyErr_SetString(PyExc_AttributeError, which ? "send_lock" : "lock"); return NULL; }
    return Py_NewRef(lock);
}

static PyGetSetDef CC_getset[] = {
    {"lock", (getter)CC_get_lock, (setter)CC_set_lock, "guards the states below, and the reader's turn", NULL},
    {"send_lock", (getter)CC_get_lock, (setter)CC_set_lock, "one frame written at a time", (void *)1},
    {NULL}
};

static PyMemberDef CC_members[] = {
    {"sock", T_OBJECT_EX, offsetof(ConnectionCore, sock), 0, "the socket"},
    {"parser", T_OBJECT_EX, offsetof(ConnectionCore, parser), 0, "the replies' FrameParser"},
    {"waiting", T_OBJECT_EX, offsetof(ConnectionCore, waiting), 0, "call id -> the condition its thread waits on"},
    {"broken", T_OBJECT, offsetof(ConnectionCore, broken), 0, "why the connection is unusable (None: it is not)"},
    {"reading", T_BOOL, offsetof(ConnectionCore, reading), 0, "a thread reads the socket for every call"},
    {"alone", T_BOOL, offsetof(ConnectionCore, alone), 0, "call_alone may take the usual call (not over TLS)"},
    {"retired", T_BOOL, offsetof(ConnectionCore, retired), 0, "taken out of use: closed when its last call ends"},
    {"last_read", T_DOUBLE, offsetof(ConnectionCore, last_read), 0, "when bytes last came (time.monotonic())"},
    {"idle_check_after", T_DOUBLE, offsetof(ConnectionCore, idle_check_after), 0, "see IDLE_CHECK_AFTER"},
    {"alone_limit", T_PYSSIZET, offsetof(ConnectionCore, alone_limit), 0, "a frame call_alone sends is shorter"},
    {"fork_generation", T_ULONG, offsetof(ConnectionCore, fork_generation), 0, "fork_generation() when made"},
    {NULL}
};

static int CC_traverse(ConnectionCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->sock); Py_VISIT(self->parser); Py_VISIT(self->lock); Py_VISIT(self->send_lock);
    Py_VISIT(self->waiting); Py_VISIT(self->broken); Py_VISIT(self->lock_acquire); Py_VISIT(self->lock_release);
    Py_VISIT(self->send_acquire); Py_VISIT(self->send_release);
    return 0;
}

static int CC_clear(ConnectionCore *self) {
    Py_CLEAR(self->sock); Py_CLEAR(self->parser); Py_CLEAR(self->lock); Py_CLEAR(self->send_lock);
    Py_CLEAR(self->waiting); Py_CLEAR(self->broken); Py_CLEAR(self->lock_acquire); Py_CLEAR(self->lock_release);
    Py_CLEAR(self->send_acquire); Py_CLEAR(self->send_release);
    return 0;
}

static void CC_dealloc(ConnectionCore *self) {
    PyObject_GC_UnTrack(self);
    CC_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject ConnectionCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.ConnectionCore",
    .tp_basicsize = sizeof(ConnectionCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The state of a blocking TCP client's connection that call_alone shares (BlockingConnection's base).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)CC_dealloc,
    .tp_traverse = (traverseproc)CC_traverse,
    .tp_clear = (inquiry)CC_clear,
    .tp_members = CC_members,
    .tp_getset = CC_getset,
};
