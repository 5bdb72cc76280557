/*
 * The module: its functions, its init, and the export of the constants
 * (layout.h) and of the Python names C uses (names.h).
 */
#include "core.h"

#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>

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

/* ---- the worker's watchdog of its owner -----------------------------------
 * A worker must not outlive the process that owns its service, even inside a
 * call that never returns, and a parent-death signal cannot promise it (it
 * comes when the *thread* that started the worker ends, and a handler cannot
 * interrupt a call).  A thread of our own, unknown to Python and with every
 * signal blocked (so that signals go to the main thread), waits on pidfds of
 * the processes to watch; when one of them ends it sends this process SIGTERM
 * (an idle worker stops at once, a call in hand may finish) and, `grace`
 * later, SIGKILL.  It touches no Python object. */
#define MAX_WATCHED 4
static struct { int fds[MAX_WATCHED]; int n; uint64_t grace_ns; } watched;
static int watching = 0;

static void *watchdog(void *unused) {
    struct pollfd p[MAX_WATCHED];
    for (int i = 0; i < watched.n; i++) { p[i].fd = watched.fds[i]; p[i].events = POLLIN; p[i].revents = 0; }
    for (;;) {
        int rc = poll(p, (nfds_t)watched.n, -1);
        if (rc > 0) break;
        if (rc < 0 && errno != EINTR) return NULL;   /* cannot watch: the worker's checks each second remain */
    }
    kill(getpid(), SIGTERM);
    struct timespec ts = {(time_t)(watched.grace_ns / 1000000000ull), (long)(watched.grace_ns % 1000000000ull)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    static const char msg[] = "speedysvc worker: the service's owner is gone and the call in hand did not end; "
                              "killing this worker\n";
    if (write(2, msg, sizeof msg - 1) < 0) { /* nobody to tell */ }
    kill(getpid(), SIGKILL);
    return NULL;
}

/* watch_processes(pidfds, grace): start the watchdog (once per process) on up
 * to MAX_WATCHED pidfds, which stay open for the life of the process. */
static PyObject *m_watch_processes(PyObject *self, PyObject *args) {
    PyObject *fds; double grace;
    if (!PyArg_ParseTuple(args, "Od", &fds, &grace) || check_timeout(grace)) return NULL;
    PyObject *seq = PySequence_Fast(fds, "pidfds must be a sequence of file descriptors");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_WATCHED) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "watch 1 to %d processes", MAX_WATCHED);
    }
    if (watching) { Py_DECREF(seq); PyErr_SetString(PyExc_RuntimeError, "this process is already watched"); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (fd == -1 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
        if (fd < 0 || fd > INT_MAX) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "bad file descriptor"); return NULL; }
        watched.fds[i] = (int)fd;
    }
    Py_DECREF(seq);
    watched.n = (int)n;
    watched.grace_ns = (uint64_t)(grace * 1e9);
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_t attr;
    pthread_t tid;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_sigmask(SIG_BLOCK, &all, &old);   /* the thread starts with every signal blocked */
    int rc = pthread_create(&tid, &attr, watchdog, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) { errno = rc; return PyErr_SetFromErrno(PyExc_OSError); }
    watching = 1;
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
    r->base = p; r->size = size; r->owns = 1; r->exports = 0; r->last_caller_cpu = -1; r->gen = GEN_UNKNOWN;
    return (PyObject *)r;
}

/* glibc hands large allocations to mmap and gives them back at free, so a
 * process that decodes a 1 MiB payload per call takes hundreds of page faults
 * per call; workers keep such memory in the heap instead. */
static PyObject *m_keep_large_allocations(PyObject *self, PyObject *args) {
    int mmap_threshold, trim_threshold;
    if (!PyArg_ParseTuple(args, "ii", &mmap_threshold, &trim_threshold)) return NULL;
#ifdef __SANITIZE_ADDRESS__
    /* built for AddressSanitizer (scripts/asan.sh): its allocator refuses mallopt and has a
     * policy of its own */
    Py_RETURN_NONE;
#endif
    if (!mallopt(M_MMAP_THRESHOLD, mmap_threshold) || !mallopt(M_TRIM_THRESHOLD, trim_threshold)) {
        PyErr_SetString(PyExc_ValueError, "mallopt refused the thresholds");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- BytesToFill: a bytes object that a reader fills in place --------------
 * A TCP client receives a large reply straight into the bytes object it
 * returns: no buffer of its own to fault in and then copy out of (16 MiB: a
 * sixth of a raw echo's time here).  The object exports a writable view of the
 * bytes' memory while they are filled; take() hands the bytes out when no view
 * is left, and a copy while one is (a reader that still holds its last view:
 * asyncio's selector loop), so nothing can change them after anyone sees them. */
typedef struct {
    PyObject_HEAD
    PyObject *bytes;        /* NULL once taken */
    Py_ssize_t exports;
} BytesToFill;

static PyObject *BytesToFill_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "n", &n)) return NULL;
    if (n < 0) { PyErr_SetString(PyExc_ValueError, "size must not be negative"); return NULL; }
    BytesToFill *self = (BytesToFill *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->bytes = PyBytes_FromStringAndSize(NULL, n);   /* (not zeroed: every byte is filled before take) */
    if (!self->bytes) { Py_DECREF(self); return NULL; }
    self->exports = 0;
    return (PyObject *)self;
}

static void BytesToFill_dealloc(BytesToFill *self) {
    Py_XDECREF(self->bytes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int BytesToFill_getbuffer(BytesToFill *self, Py_buffer *view, int flags) {
    if (!self->bytes) { PyErr_SetString(PyExc_BufferError, "the bytes were taken"); return -1; }
    if (PyBuffer_FillInfo(view, (PyObject *)self, PyBytes_AS_STRING(self->bytes), PyBytes_GET_SIZE(self->bytes),
                          0, flags) < 0) return -1;
    self->exports++;
    return 0;
}

static void BytesToFill_releasebuffer(BytesToFill *self, Py_buffer *view) { self->exports--; }

static PyObject *BytesToFill_take(BytesToFill *self, PyObject *unused) {
    if (!self->bytes) { PyErr_SetString(PyExc_BufferError, "the bytes were taken"); return NULL; }
    if (self->exports)
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self->bytes), PyBytes_GET_SIZE(self->bytes));
    PyObject *b = self->bytes;
    self->bytes = NULL;
    return b;
}

static Py_ssize_t BytesToFill_len(BytesToFill *self) {
    return self->bytes ? PyBytes_GET_SIZE(self->bytes) : 0;
}

static PyBufferProcs BytesToFill_as_buffer = {(getbufferproc)BytesToFill_getbuffer,
                                              (releasebufferproc)BytesToFill_releasebuffer};
static PySequenceMethods BytesToFill_as_sequence = {.sq_length = (lenfunc)BytesToFill_len};
static PyMethodDef BytesToFill_methods[] = {
    {"take", (PyCFunction)BytesToFill_take, METH_NOARGS,
     "the bytes (a copy while a view of them is alive); the object is empty after, unless it copied"},
    {NULL}
};

static PyTypeObject BytesToFillType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "speedysvc._shmcore.BytesToFill",
    .tp_basicsize = sizeof(BytesToFill),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BytesToFill(n): n bytes to fill through a writable view, then take() as a bytes object",
    .tp_new = BytesToFill_new,
    .tp_dealloc = (destructor)BytesToFill_dealloc,
    .tp_as_buffer = &BytesToFill_as_buffer,
    .tp_as_sequence = &BytesToFill_as_sequence,
    .tp_methods = BytesToFill_methods,
};

static PyMethodDef module_methods[] = {
    {"keep_large_allocations", m_keep_large_allocations, METH_VARARGS,
     "mallopt(M_MMAP_THRESHOLD, a); mallopt(M_TRIM_THRESHOLD, b)"},
    {"map_fd", m_map_fd, METH_VARARGS, "map a file descriptor MAP_SHARED; the Region owns the mapping"},
    {"set_spin", m_set_spin, METH_O, "set the longest spin before sleeping, in microseconds (0 disables)"},
    {"get_spin", m_get_spin, METH_NOARGS, "(max, client budget, worker budget) in microseconds"},
    {"msgpack_dumps", m_msgpack_dumps, METH_O, "msgpack.Packer(use_bin_type=True).pack, the usual values in C"},
    {"msgpack_loads", m_msgpack_loads, METH_O, "msgpack.unpackb, the usual values in C (other values of 1 MiB or more: ValueError, for codecs.msgpack to read in slices)"},
    {"set_msgpack", m_set_msgpack, METH_VARARGS, "set_msgpack(pack, unpackb[, ExtraData]): what takes every other value (and the error for bytes after a whole value)"},
    {"call_alone", (PyCFunction)(void (*)(void))m_call_alone, METH_FASTCALL,
     "a TCP client's call alone on its connection (see tcp.client.BlockingConnection)"},
    {"call_usual", (PyCFunction)(void (*)(void))m_call_usual, METH_FASTCALL,
     "a TCP transport's usual call, its frame built in C (see tcp.client.TcpTransport._call); None: not taken"},
    {"next_call_id", m_next_call_id, METH_NOARGS, "the next TCP call id of this process (1..2**32-1, then round again)"},
    {"fork_generation", m_fork_generation, METH_NOARGS, "how many times this process's line was forked: 0, then 1 in a child, ..."},
    {"set_parent_death_signal", m_set_parent_death_signal, METH_O, "prctl(PR_SET_PDEATHSIG)"},
    {"watch_processes", m_watch_processes, METH_VARARGS,
     "watch_processes(pidfds, grace): when one of these processes ends, SIGTERM this one, then SIGKILL after grace"},
    {NULL}
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_shmcore", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__shmcore(void) {
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1) ncpu = 1;
    client_spin.budget_ns = worker_spin.budget_ns = spin_max_ns;
    if (PyType_Ready(&RegionType) < 0 || PyType_Ready(&ShmMethodType) < 0 || PyType_Ready(&GatewayType) < 0
        || PyType_Ready(&LocalWayType) < 0 || PyType_Ready(&BytesToFillType) < 0
        || PyType_Ready(&TcpMethodType) < 0 || PyType_Ready(&ConnectionCoreType) < 0
        || PyType_Ready(&ServerConnectionCoreType) < 0) return NULL;
    if (names_init() < 0 || serve_init() < 0 || call_alone_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) return NULL;
    Py_INCREF(&ShmMethodType);
    if (PyModule_AddObject(m, "ShmMethod", (PyObject *)&ShmMethodType) < 0) return NULL;
    Py_INCREF(&GatewayType);
    if (PyModule_AddObject(m, "Gateway", (PyObject *)&GatewayType) < 0) return NULL;
    Py_INCREF(&LocalWayType);
    if (PyModule_AddObject(m, "LocalWay", (PyObject *)&LocalWayType) < 0) return NULL;
    Py_INCREF(&ServerConnectionCoreType);
    if (PyModule_AddObject(m, "ServerConnectionCore", (PyObject *)&ServerConnectionCoreType) < 0) return NULL;
    Py_INCREF(&ConnectionCoreType);
    if (PyModule_AddObject(m, "ConnectionCore", (PyObject *)&ConnectionCoreType) < 0) return NULL;
    Py_INCREF(&TcpMethodType);
    if (PyModule_AddObject(m, "TcpMethod", (PyObject *)&TcpMethodType) < 0) return NULL;
    Py_INCREF(&BytesToFillType);
    if (PyModule_AddObject(m, "BytesToFill", (PyObject *)&BytesToFillType) < 0) return NULL;
#define ADD(name) if (PyModule_AddIntConstant(m, #name, name) < 0) return NULL;
    LAYOUT_CONSTANTS(ADD)
#undef ADD
    if (PyModule_AddIntConstant(m, "MSGPACK_LARGE_FALLBACK", MP_LARGE_FALLBACK) < 0) return NULL;
    PyObject *names = names_table();
    if (!names || PyModule_AddObject(m, "PYTHON_NAMES", names) < 0) { Py_XDECREF(names); return NULL; }
    return m;
}
