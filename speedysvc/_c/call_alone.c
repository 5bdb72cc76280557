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
#include <sys/socket.h>

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
    PyObject *waiting = PyObject_GetAttr(conn, s_waiting_c);
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

/* call_alone(conn, frame, call_id, timeout) -> (status, payload) | None | what conn._read_on returns */
PyObject *m_call_alone(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
    end_turn_on_error(conn, call_id);
out:
    Py_DECREF(lock);
    return result;
}
