# Types of the compiled tunnel transport. The source is _tunnel_c.py, a symlink to
# src/backhaul/transport/_tunnel_py.py; this augmenting .pxd turns _TunnelCore into a cdef
# class. Every field stays public: owners, subclasses (relay/peering.py's LinkTunnel) and
# tests read them, and both builds must answer the same. The per-read and per-stream-write
# methods are cpdef, so the compiled pipes and the session call them in C.

cimport cython
from backhaul.protocol._mux_c cimport Session


cdef class _TunnelCore:
    # The tunnel's state machine (the compiled mux).
    cdef public Session session
    # The relay or connector told about tunnel and stream events (endpoints.TunnelOwner).
    cdef public object owner
    # For log lines: "<connector>@<worker>", "peer:<node>...".
    cdef public object name
    # stream id -> the local end of the stream (endpoints.StreamEndpoint).
    cdef public dict endpoints
    # stream id -> [(data, end)] that came before the owner accepted the stream.
    cdef public dict _early
    # The FlowControl the tunnel was made with.
    cdef public object _flow
    # FlowControl.tunnel_write_low: a batch this big is written at once (send()).
    cdef public long long _flush_at
    # The TLS transport's write buffer is above its high mark.
    cdef public bint write_paused
    # Endpoints that stopped reading because of that; resumed together.
    cdef public set _stalled
    # Streams whose end waits in the session's queue for credit.
    cdef public set _ending
    # The TLS transport, or None before connection_made.
    cdef public object transport
    # "host:port" of the other end.
    cdef public object peer
    # time.monotonic() at construction.
    cdef public double opened_at
    # Last PING round trip in seconds, or None.
    cdef public object rtt
    # The session ended (TunnelFailed handled).
    cdef public bint closed
    # connection_lost ran.
    cdef public bint lost
    # Streams still open when the tunnel ended.
    cdef public long long streams_lost
    # Bytes read from / written to the TLS transport.
    cdef public long long bytes_in
    cdef public long long bytes_out
    # The connector id at the other end (relay side), or None.
    cdef public object peer_id
    # What the owner keeps about the tunnel (never read here).
    cdef public object info
    # The event loop (call_soon, call_later).
    cdef public object _loop
    # A flush is due: a call_soon is pending or _process is handing out events.
    cdef public bint _flush_scheduled
    # The keepalive TimerHandle, or None.
    cdef public object _keepalive
    # Reading is paused because the session holds its input.
    cdef public bint _reading_held
    # The abort-after-close TimerHandle, or None.
    cdef public object _abort_timer
    # Event type -> bound handler.
    cdef public dict _dispatch

    cpdef get_buffer(self, sizehint)
    cpdef buffer_updated(self, nbytes)
    cpdef send(self, stream_id, data, end=*)
    cpdef consumed(self, stream_id, nbytes)
    cpdef schedule_flush(self)
    cpdef flush(self)
    @cython.locals(session=Session)
    cpdef _process(self)
    cpdef _forget_if_closed(self, stream_id)
