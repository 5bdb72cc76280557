/*
 * The shared-memory layout and the TCP frame: every offset, state, code and
 * frame constant that C and Python both use, defined here once.  module.c
 * exports each name listed in LAYOUT_CONSTANTS (at the end) to Python as an int
 * (speedysvc._shmcore.C_STATE, ...), so Python keeps no copy of its own: adding
 * a constant is its #define and one entry in the list.  docs/shm-protocol.md
 * and docs/tcp-protocol.md describe the layouts.
 */
#ifndef SPEEDYSVC_LAYOUT_H
#define SPEEDYSVC_LAYOUT_H

/* ---- the service segment's header ------------------------------------- */
#define MAGIC            0x43565353u   /* "SSVC" */
#define LAYOUT_VERSION   6u

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
                                  bit 1, the first workers have started;
                                  bit 2, the owner is restarting the service: a new segment
                                  comes in this one's place (callers wait for it) */
#define OWNER_RESTARTS_WORKERS 1u
#define OWNER_WORKERS_STARTED  2u
#define OWNER_RESTARTING       4u
#define NAME_SIZE        64
#define H_SEQ            64    /* own cache line: futex word workers sleep on */
#define H_SLEEPERS       68
#define H_REFUSED        128   /* u64, own cache line: calls its callers were refused (the service
                                  stopping, stopped, failed or not up within the wait); each caller
                                  adds its own with an atomic add */
#define H_LOST           136   /* u64: calls lost with WorkerDied (their worker died in them) */
#define H_BITMAP         256   /* one bit per channel with a posted call (at most 512 bytes) */
#define H_SPIN_UNTIL     768   /* u64, own cache line, CLOCK_MONOTONIC ns: a worker spins looking
                                  for posted calls until then (the latest such promise; 0 or past:
                                  none), written only while some worker sleeps.  A call posted
                                  before then wakes nobody: the spinner takes it (serve.c) */
/* ---- TCP served by the workers (layout 5): the header field of this block ----------
 * (kept apart: the rest of the header is shared with other changes) */
#define H_TCP_OFF        192   /* u32: where the per-worker TCP records start (see T_* below) */
/* ---- end of the TCP header block ---- */
#define H_REASON         1024  /* why the service is stopping, stopped or failed: UTF-8, NUL-padded,
                                  written by the owner before it sets that state */
#define REASON_SIZE      1024

/* ---- the worker table --------------------------------------------------- */
#define H_WORKERS        4096
#define W_SIZE           64
#define W_PID            0
#define W_STATE          4     /* WORKER_FREE, WORKER_IDLE or WORKER_BUSY */
#define W_CALLS          8
#define W_BUSY_NS        16
#define W_STARTED_NS     24
#define W_ERRORS         32
#define W_CLAIM_NS       40
#define W_START_TICKS    48    /* u64, the worker's start time (clock ticks), against pid reuse */
#define W_METHOD         56    /* u32, the method of the call in hand: its index + 1 (0: none or
                                  unknown); written as the call starts, meaningful while the
                                  state is WORKER_BUSY (the reply ends it by going idle) */
/* ---- workers that serve TCP themselves (layout 5; see docs/shm-protocol.md) ----
 * One call at a time per worker process: its shared-memory loop and its TCP thread take
 * turns through W_PHASE (u32, the last word of the entry).  The loop moves it IDLE -> SHM
 * (CAS) before it claims a posted call and back to IDLE when it replies (or claimed
 * nothing); the TCP thread moves it IDLE -> TCP to run a call in its own process, and posts
 * the call to another worker when the CAS fails.  A loop that finds TCP sets PHASE_WAITING
 * beside it and sleeps on the word; the TCP thread wakes it when the call ends. */
#define W_PHASE          60
#define PHASE_IDLE       0u
#define PHASE_SHM        1u
#define PHASE_TCP        2u
#define PHASE_WAITING    4u    /* with PHASE_TCP: the loop sleeps on W_PHASE for its end */
/* worker states (W_STATE) */
#define WORKER_FREE      0     /* the entry is unused */
#define WORKER_IDLE      1
#define WORKER_BUSY      2     /* running a call it claimed */

/* ---- the channel table -------------------------------------------------- */
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
#define C_POSTED_NS      56    /* u64, CLOCK_MONOTONIC when the call was posted: the worker's
                                  claim time minus this is the call's wait for a worker */
#define C_STATUS         64
#define C_RESP_OFF       72
#define C_RESP_LEN       80
#define C_WORKER_CPU     88    /* where the worker ran when it claimed */
/* the owner field (C_OWNER_PID) of a channel being reclaimed: whoever CASes a
 * dead owner's pid to this frees the channel, and nobody else touches it */
#define CHANNEL_RECLAIMING 0xFFFFFFFFu

#define MAX_CHANNELS_LIMIT 4096
#define MAX_WORKERS      64
#define MAX_METHODS      64
/* per-method statistics: one record per (worker, method), written by that
 * worker only; a supervisor sums them */
#define M_SIZE           512
#define M_CALLS          0
#define M_ERRORS         8
#define M_TOTAL_NS       16
#define M_MAX_NS         24
#define M_BUCKETS        32    /* u64[28]: bucket b counts calls under 2^b µs; the last, all slower */
#define M_NBUCKETS       28
/* the wait for a worker (posted -> claimed), as the service time above */
#define M_WAIT_NS        256
#define M_WAIT_MAX_NS    264
#define M_WAIT_BUCKETS   272   /* u64[28], as M_BUCKETS; ends at 496 */

/* ---- per-worker TCP records (layout 5), at H_TCP_OFF: one per worker-table entry -------
 * Written by that entry's worker only (its TCP thread), summed by supervisors.  Gauges
 * are what the worker holds now: the entry's registration and the reaping of a dead
 * worker clear them, so a worker killed -9 leaks no share of a limit.  Counters are never
 * cleared (as the method statistics): a worker reusing an entry adds to them, so the
 * totals never drop when workers go; a worker adds what it counted once a second and as
 * it stops. */
#define T_SIZE              128
#define T_CLIENTS           0     /* u64 gauge: connections past the handshake */
#define T_HANDSHAKING       8     /* u64 gauge: connections in the handshake */
#define T_INFLIGHT          16    /* u64 gauge: calls posted to the pool and not answered yet */
#define T_CONNECTIONS_TOTAL 24    /* u64 counters from here on */
#define T_CALLS             32
#define T_ERRORS            40
#define T_REFUSED           48
#define T_AUTH_FAILURES     56
#define T_PROTOCOL_ERRORS   64
#define T_BYTES_IN          72
#define T_BYTES_OUT         80
#define T_ANSWERED_INLINE   88
#define T_HANDSHAKES_EVICTED 96
#define T_LISTENING         104   /* u32: 1 while the worker's TCP server accepts */
#define T_LEASE             112   /* u64 gauge: the share of max_inflight the worker holds (TcpServer's
                                     calls in flight stay within it; the leases sum to max_inflight
                                     at most: see tcp/admission.py, SharedAdmission) */
#define T_SHORT             120   /* u32: 1 while calls of the worker wait for room the others' leases hold */

/* ---- states and codes --------------------------------------------------- */
/* service states */
#define SVC_STARTING 0
#define SVC_SERVING  1
#define SVC_STOPPING 2
#define SVC_STOPPED  3
#define SVC_FAILED   4     /* stopped by its owner after a failure (the reason in H_REASON) */

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

/* a response's status (C_STATUS), which a TCP reply frame carries as it is */
#define STATUS_OK    0
#define STATUS_ERROR 1

/* What Region.post returns: posted, or posted and a sleeping worker had to be
 * woken for it (Region.collect wants to know)... */
#define POSTED       0
#define POSTED_WOKE  (-1)
/* ...and what Region.post and Region.call return when they have no response
 * in hand (call returns a small response itself, as bytes or (status, bytes)) */
#define CALL_TOO_BIG     1   /* the request does not fit the channel's data segment: nothing posted */
#define CALL_NOT_SERVING 2   /* the service is not serving: nothing posted */
#define CALL_PENDING     3   /* still in flight at the timeout */
#define CALL_READY       4   /* answered: read it with wait_reply (a large response, or one
                                in a data segment the worker grew) */

/* A response of at most this many bytes comes back from Region.call as bytes;
 * a larger one is read with wait_reply. */
#define SMALL_RESPONSE 65536
/* A request of at most this many bytes is handed to a method as bytes (cheaper
 * to make than a view); a larger one, or any to a raw method, as a read-only
 * view into the channel. */
#define SMALL_REQUEST  4096

/* Payloads of at least this many bytes that msgpack's C encoder takes are encoded straight
 * into the channel's data segment (a request by ShmMethod, a response by the worker's loop)
 * rather than into a bytes object that is then copied there: a copy less of a large payload
 * on each side.  Below it, the bytes object is cheaper than the extra bookkeeping. */
#define IN_PLACE_MIN 65536

/* ---- the TCP frame (docs/tcp-protocol.md) --------------------------------
 * framing.FRAME ("<BBHIIIQ"): kind, flags, name length, call id, codec flags /
 * status, timeout (ms), payload length; little-endian, as the project's
 * targets (x86-64 / arm64 Linux) are. */
#define FRAME_HEADER     24
#define FRAME_KIND       0     /* u8: FRAME_CALL, FRAME_REPLY or FRAME_GOAWAY */
#define FRAME_FLAGS      1     /* u8: FRAME_F_* bits */
#define FRAME_NAME_LEN   2     /* u16: the method name's length (a call's only) */
#define FRAME_CALL_ID    4     /* u32 */
#define FRAME_ARG        8     /* u32: a call's codec flags, a reply's status */
#define FRAME_TIMEOUT    12    /* u32: a call's timeout in ms, 0 for none */
#define FRAME_LENGTH     16    /* u64: the payload's length (after the name) */
#define FRAME_CALL       1
#define FRAME_REPLY      2
#define FRAME_GOAWAY     3
#define FRAME_MAX_NAME   64    /* a method name's most bytes */
#define FRAME_F_COMPRESSED 0x1 /* the payload is compressed (the original length in front) */
#define FRAME_KNOWN_FLAGS  FRAME_F_COMPRESSED
/* a reply's or go-away's: the call (a go-away's: every call of the connection still without a
 * reply) never started, so it may be sent again; only to a client whose hello asked for it */
#define FRAME_F_NOT_RUN    0x2

/* Every constant above, for module.c to export: X(NAME) each. */
#define LAYOUT_CONSTANTS(X) \
    X(MAGIC) X(LAYOUT_VERSION) \
    X(H_MAGIC) X(H_VERSION) X(H_MAX_CHANNELS) X(H_MAX_WORKERS) X(H_MAX_PAYLOAD) X(H_OWNER_PID) X(H_STATE) \
    X(H_CREATED_NS) X(H_OWNER_START) X(H_STATS_OFF) X(H_MAX_METHODS) X(H_NAMES_OFF) X(H_OWNER_FLAGS) \
    X(OWNER_RESTARTS_WORKERS) X(OWNER_WORKERS_STARTED) X(OWNER_RESTARTING) X(NAME_SIZE) X(H_SEQ) X(H_SLEEPERS) \
    X(H_REFUSED) X(H_LOST) \
    X(H_BITMAP) X(H_SPIN_UNTIL) X(H_REASON) X(REASON_SIZE) \
    X(H_TCP_OFF) X(T_SIZE) X(T_CLIENTS) X(T_HANDSHAKING) X(T_INFLIGHT) X(T_CONNECTIONS_TOTAL) X(T_CALLS) \
    X(T_ERRORS) X(T_REFUSED) X(T_AUTH_FAILURES) X(T_PROTOCOL_ERRORS) X(T_BYTES_IN) X(T_BYTES_OUT) \
    X(T_ANSWERED_INLINE) X(T_HANDSHAKES_EVICTED) X(T_LISTENING) X(T_LEASE) X(T_SHORT) \
    X(H_WORKERS) X(W_SIZE) X(W_PID) X(W_STATE) X(W_CALLS) X(W_BUSY_NS) X(W_STARTED_NS) X(W_ERRORS) \
    X(W_CLAIM_NS) X(W_START_TICKS) X(W_METHOD) X(W_PHASE) X(PHASE_IDLE) X(PHASE_SHM) X(PHASE_TCP) \
    X(PHASE_WAITING) X(WORKER_FREE) X(WORKER_IDLE) X(WORKER_BUSY) \
    X(H_CHANNELS) X(C_SIZE) X(C_STATE) X(C_OWNER_PID) X(C_DATA_GEN) X(C_FLAGS) X(C_DATA_CAP) X(C_REQ_LEN) \
    X(C_NAME_LEN) X(C_OWNER_START) X(C_CALLER_CPU) X(C_POSTED_NS) X(C_STATUS) X(C_RESP_OFF) X(C_RESP_LEN) X(C_WORKER_CPU) \
    X(CHANNEL_RECLAIMING) \
    X(MAX_CHANNELS_LIMIT) X(MAX_WORKERS) X(MAX_METHODS) \
    X(M_SIZE) X(M_CALLS) X(M_ERRORS) X(M_TOTAL_NS) X(M_MAX_NS) X(M_BUCKETS) X(M_NBUCKETS) \
    X(M_WAIT_NS) X(M_WAIT_MAX_NS) X(M_WAIT_BUCKETS) \
    X(SVC_STARTING) X(SVC_SERVING) X(SVC_STOPPING) X(SVC_STOPPED) X(SVC_FAILED) \
    X(ST_IDLE) X(ST_REQUEST) X(ST_CLAIMED) X(ST_RESPONSE) X(ST_ABANDONED) X(ST_CODE) X(ST_WAITING) \
    X(ST_PID_SHIFT) \
    X(STATUS_OK) X(STATUS_ERROR) \
    X(POSTED) X(POSTED_WOKE) X(CALL_TOO_BIG) X(CALL_NOT_SERVING) X(CALL_PENDING) X(CALL_READY) \
    X(SMALL_RESPONSE) X(SMALL_REQUEST) X(IN_PLACE_MIN) \
    X(FRAME_HEADER) X(FRAME_KIND) X(FRAME_FLAGS) X(FRAME_NAME_LEN) X(FRAME_CALL_ID) X(FRAME_ARG) \
    X(FRAME_TIMEOUT) X(FRAME_LENGTH) X(FRAME_CALL) X(FRAME_REPLY) X(FRAME_GOAWAY) X(FRAME_MAX_NAME) \
    X(FRAME_F_COMPRESSED) X(FRAME_KNOWN_FLAGS) X(FRAME_F_NOT_RUN)

#endif
