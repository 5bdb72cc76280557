/*
 * Every Python attribute, method and dictionary key that C reads, writes or
 * calls by name, by what it belongs to: one row X(owner, variable, "name")
 * each.  boundary.c makes each variable an interned str at import, and
 * module.c exports the table as _shmcore.PYTHON_NAMES, {owner: (name, ...)},
 * which tests/test_c_contract.py checks against real instances of those
 * classes: a name renamed on one side only fails there, not in the hot path.
 * Objects that never change for the object C keeps them in are passed in at
 * construction instead (ShmMethod's codec functions and fallback, Gateway's
 * transport, server and counters).
 */
#ifndef SPEEDYSVC_NAMES_H
#define SPEEDYSVC_NAMES_H

#define PYTHON_NAMES(X) \
    /* shm/transport.py: ShmMethod and Gateway take channels from the attachment, \
     * and hand the cases they do not do themselves back to the transport */ \
    X("ShmTransport", s_channels, "_channels") \
    X("ShmTransport", s_call, "call") \
    X("ShmTransport", s_resume, "_resume") \
    X("ShmTransport", s_abort, "_abort") \
    /* shm/channels.py */ \
    X("Channels", s_chans_region, "region") \
    X("Channels", s_free, "free") \
    X("Channels", s_closed, "closed") \
    X("Channels", s_retire, "retire") \
    X("Channel", s_ch_region, "region") \
    X("Channel", s_slot, "slot") \
    /* tcp/admission.py: whether the gateway has room for a call */ \
    X("Admission", s_closing, "closing") \
    X("Admission", s_inflight, "inflight") \
    X("Admission", s_max_inflight, "max_inflight") \
    X("Admission", s_waiting, "waiting") \
    X("Gateway counters", k_calls, "calls") \
    X("Gateway counters", k_answered, "answered_inline") \
    X("Gateway counters", k_bytes_in, "bytes_in") \
    X("Gateway counters", k_bytes_out, "bytes_out") \
    X("Gateway counters", k_errors, "errors") \
    /* tcp/framing.py: an empty parser, its buffer and its limit */ \
    X("FrameParser", s_end, "_end") \
    X("FrameParser", s_big, "_big") \
    X("FrameParser", s_buf, "_buf") \
    X("FrameParser", s_max_payload, "max_payload") \
    /* tcp/connection.py: ServerConnectionCore hands what is not the short way back to \
     * ServerConnection, and binds its parser's and transport's methods */ \
    X("ServerConnection", s_hello_buffer, "_hello_buffer") \
    X("ServerConnection", s_posted, "_posted") \
    X("ServerConnection", s_buffer_updated_slow, "_buffer_updated") \
    X("FrameParser", s_parser_get_buffer, "get_buffer") \
    X("asyncio.Transport", s_write, "write") \
    /* tcp/client.py: call_alone keeps the connection's states as BlockingConnection.call \
     * does (in ConnectionCore, its base), and hands what is not usual back to it */ \
    X("BlockingConnection", s_failed_to_send, "_failed_to_send") \
    X("BlockingConnection", s_read_on, "_read_on") \
    X("BlockingConnection", s_unregister, "_unregister") \
    X("BlockingConnection", s_pass_reading_on, "_pass_reading_on") \
    X("BlockingConnection", s_close, "close") \
    /* tcp/client.py: TcpMethod takes the transport's connection, and hands the cases it \
     * does not do itself back to the transport */ \
    X("TcpTransport", s_conn, "_conn") \
    X("TcpTransport", s_tcp_call, "call") \
    X("TcpTransport", s_after_alone, "_after_alone") \
    /* the standard library's */ \
    X("threading.Lock", s_acquire, "acquire") \
    X("threading.Lock", s_release, "release") \
    X("socket.socket", s_fileno, "fileno")

#endif
