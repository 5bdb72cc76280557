/*
 * The module: its functions, its init, and the export of the constants
 * (layout.h) and of the Python names C uses (names.h).
 */
#include "core.h"

#include <malloc.h>
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
     "a TCP client's call alone on its connection (see tcp.client.BlockingConnection)"},
    {"set_parent_death_signal", m_set_parent_death_signal, METH_O, "prctl(PR_SET_PDEATHSIG)"},
    {NULL}
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_shmcore", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__shmcore(void) {
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1) ncpu = 1;
    client_spin.budget_ns = worker_spin.budget_ns = spin_max_ns;
    if (PyType_Ready(&RegionType) < 0 || PyType_Ready(&ShmMethodType) < 0 || PyType_Ready(&GatewayType) < 0) return NULL;
    if (names_init() < 0 || serve_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) return NULL;
    Py_INCREF(&ShmMethodType);
    if (PyModule_AddObject(m, "ShmMethod", (PyObject *)&ShmMethodType) < 0) return NULL;
    Py_INCREF(&GatewayType);
    if (PyModule_AddObject(m, "Gateway", (PyObject *)&GatewayType) < 0) return NULL;
#define ADD(name) if (PyModule_AddIntConstant(m, #name, name) < 0) return NULL;
    LAYOUT_CONSTANTS(ADD)
#undef ADD
    PyObject *names = names_table();
    if (!names || PyModule_AddObject(m, "PYTHON_NAMES", names) < 0) { Py_XDECREF(names); return NULL; }
    return m;
}
