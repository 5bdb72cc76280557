"""Once a second, the gateway's sweep: drop clients that stall a handshake or a frame
(slow-loris), or that read none of their replies (for ``stall_timeout``, or for a
second while their unread answers hold room that other clients' calls wait for)."""
from __future__ import annotations

import logging

from ..errors import ProtocolError

log = logging.getLogger("speedysvc.tcp")

INTERVAL = 1.0


def sweep(server, now: float) -> None:
    """Check every connection of ``server`` (a ``TcpServer``) at ``now`` (time.monotonic())."""
    handshake_timeout, stall_timeout = server.options.handshake_timeout, server.options.stall_timeout
    for conn in list(server.connections):
        if conn.eof:   # half-closed: closed once its calls are answered (normally as the last one is)
            conn.close_when_answered()
        if conn.parser is None and now - conn.opened > handshake_timeout:
            conn.refuse(ProtocolError(f"handshake not completed within {handshake_timeout} s"))
        elif (conn.parser is not None and conn.parser.mid_frame and not conn.paused
              and now - conn.last_progress > stall_timeout):
            # (a connection we do not read is not stalling)
            conn.go_away(ProtocolError(f"no progress within a frame for {stall_timeout} s"))
            server.counters["protocol_errors"] += 1
        elif conn.paused_by_writes and not conn.closed:
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
