"""The TCP side: the wire format (``framing``, ``compression``), the client's half of the
protocol (``protocol``) and its transports (``client``, ``aio``), and the gateway that
serves a service's workers to TCP clients (``server``; ``serve`` runs one on its own).
docs/tcp-protocol.md describes the protocol."""
