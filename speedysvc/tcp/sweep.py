"""Once a second, the gateway's sweep: drop clients that stall a handshake or a frame
(slow-loris: no byte for ``stall_timeout``, or fewer than ``min_rate`` bytes a second
over a ``stall_timeout``), or that read none of their replies (for ``stall_timeout``,
or for a second while their unread answers hold room that other clients' calls wait
for); give back the scratch buffers of idle connections, and the channels that grew
for large calls once they are idle for ``CHANNEL_IDLE`` seconds."""
from __future__ import annotations

import logging

from ..errors import ProtocolError
from ..shm.segment import INITIAL_CHANNEL_SIZE

log = logging.getLogger("speedysvc.tcp")

INTERVAL = 1.0
CHANNEL_IDLE = 5.0   # seconds a channel that grew beyond its first size stays free before it is retired


def sweep(server, now: float) -> None:
    """Check every connection of ``server`` (a ``TcpServer``) at ``now`` (time.monotonic())."""
    handshake_timeout, stall_timeout = server.options.handshake_timeout, server.options.stall_timeout
    for conn in list(server.connections):
        if conn.eof:   # half-closed: closed once its calls are answered (normally as the last one is)
            conn.close_when_answered()
        parser = conn.parser
        if parser is None:
            if now - conn.opened > handshake_timeout:
                conn.refuse(ProtocolError(f"handshake not completed within {handshake_timeout} s"))
            continue
        if not parser.mid_frame or conn.paused:   # (a connection we do not read is not stalling)
            conn.rate_mark = None
            if not parser.mid_frame:
                parser.shrink()
        elif now - conn.last_progress > stall_timeout:
            conn.go_away(ProtocolError(f"no progress within a frame for {stall_timeout} s"))
            server.counters["protocol_errors"] += 1
        elif too_slow(conn, parser, now, stall_timeout, server.options.min_rate):
            server.counters["protocol_errors"] += 1
        if conn.paused_by_writes and not conn.closed:
            if conn.reads_replies():
                conn.write_progress = now
            elif now - conn.write_progress > stall_timeout:
                # it reads none of its replies: they hold channels and memory
                log.warning("%s: TCP client %s read none of its replies for %s s; disconnected",
                            server.service, conn.peer, stall_timeout)
                conn.go_away(ProtocolError(f"replies left unread for {stall_timeout} s"))
                server.counters["protocol_errors"] += 1
            elif (conn.parked and now - conn.write_progress >= min(1.0, stall_timeout)
                  and server.admission.others_wait(conn)):
                log.warning("%s: TCP client %s left %d answers unread while other clients' calls waited; "
                            "disconnected", server.service, conn.peer, len(conn.parked))
                conn.go_away(ProtocolError(f"{len(conn.parked)} answers left unread while other clients' "
                                           f"calls waited for room"))
                server.counters["protocol_errors"] += 1
    server.shm.trim(INITIAL_CHANNEL_SIZE, CHANNEL_IDLE, now)


def too_slow(conn, parser, now: float, window: float, min_rate: int) -> bool:
    """Whether a frame in progress came at fewer than ``min_rate`` bytes a second over the last
    ``window`` seconds (its first ``window``, from when the sweep first saw it, is its grace):
    then the connection is ended.  A byte now and then keeps no frame, and the memory its
    bytes hold, for long."""
    done, got = parser.progress
    mark = conn.rate_mark
    if mark is None or mark[1] != done:   # a frame the sweep had not seen
        conn.rate_mark = (now, done, got)
        return False
    elapsed = now - mark[0]
    if elapsed < window:
        return False
    rate = (got - mark[2]) / elapsed
    if rate < min_rate:
        log.warning("%s: TCP client %s sent a frame at %.0f bytes/s, under the minimum of %d; disconnected",
                    conn.server.service, conn.peer, rate, min_rate)
        conn.go_away(ProtocolError(f"a frame arriving at {rate:.0f} bytes/s, under the minimum of {min_rate} "
                                   f"bytes/s (tcp_min_rate)"))
        return True
    conn.rate_mark = (now, done, got)
    return False
