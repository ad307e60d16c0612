# Types of the compiled tunnel multiplexer. The source is _mux_c.py, a symlink to
# src/backhaul/protocol/_mux_py.py; this augmenting .pxd turns _Stream and Session into
# cdef classes with C fields and their internals into C methods. Nothing here changes
# behaviour: the public methods stay Python methods with the same signatures.

cimport cython
from backhaul.protocol._framing_c cimport Frame, FrameDecoder, FrameEncoder

cdef int _END, _DATA, _OPEN, _OPEN_OK, _OPEN_FAIL, _FIN, _RST, _WINDOW, _PING, _PONG
cdef int _DATAGRAM, _GOAWAY, _CONTROL, _CONNECTION_STREAM


@cython.final
@cython.freelist(64)
cdef class _Stream:
    # Stream id (odd: the connector opened it, even: the relay).
    cdef public long long id
    # OPEN_OK seen (we opened it) or sent (the peer did).
    cdef public bint accepted
    # We may still send DATA.
    cdef public bint local_open
    # The peer may still send DATA.
    cdef public bint remote_open
    # Credit the peer granted us, in bytes.
    cdef public long long send_window
    # Credit we granted the peer that it has not used, in bytes.
    cdef public long long recv_window
    # Bytes the application consumed that are not yet credited back.
    cdef public long long unacked
    # deque of memoryviews waiting for credit, or None.
    cdef public object queue
    # Total bytes in queue.
    cdef public long long queued
    # FIN to send once the queue drains.
    cdef public bint end_pending
    # send_data returned False: a WriteResumed is owed.
    cdef public bint paused
    # Takes DATA as it is decoded (set_sink), or None: DATA comes as events.
    cdef public object sink


@cython.final
cdef class Session:
    # Role.RELAY or Role.CONNECTOR.
    cdef public object role
    # The FlowControl this session was made with.
    cdef object _flow
    # FlowControl.max_streams, stream_window, write_high, write_low as C ints.
    cdef Py_ssize_t _max_streams
    cdef long long _stream_window
    cdef long long _write_high
    cdef long long _write_low
    # The Keepalive settings.
    cdef object _keepalive
    # time.monotonic, or a test's fake clock.
    cdef object _clock
    # Frames in (the compiled codec: its methods are C calls from here).
    cdef FrameDecoder _decoder
    # Frames out, batched until data_to_send().
    cdef FrameEncoder _encoder
    # Open streams by id (readonly: the memory tests weigh one).
    cdef readonly dict _streams
    # Events not yet handed out by next_event().
    cdef object _events
    # The id our next open_stream() takes; the highest id we opened; the peer's highest.
    cdef long long _next_local_id
    cdef long long _last_local_id
    cdef long long _last_peer_id
    # Parity of the ids the peer opens (1 on the relay, 0 on the connector).
    cdef int _peer_parity
    # Tunnel-level credit the peer granted us, and credit we granted it (bytes).
    cdef long long _send_window
    cdef long long _recv_window
    # Bytes consumed and not yet credited back at the tunnel level.
    cdef long long _unacked
    # Streams with queued data in the order they blocked (a dict used as an ordered set).
    cdef dict _blocked
    # The tunnel failed or was closed.
    cdef bint _closed
    # next_event() hands out nothing (closed, or input held).
    cdef bint _halt
    # Replies went over their bound behind a full buffer: the transport stops reading.
    cdef public bint input_held
    # What the peer may make this side do for nothing (protocol/floods.py).
    cdef object _guard
    # GOAWAY sent / received.
    cdef bint _local_goaway
    cdef bint _remote_goaway
    # Clock reading of the last bytes received (keepalive, flood windows).
    cdef double _last_received
    # Clock reading when our outstanding PING left, or None.
    cdef object _ping_sent_at
    # Unacked bytes that trigger a WINDOW for a stream / for the tunnel.
    cdef long long _stream_update_at
    cdef long long _tunnel_update_at

    # The public methods the compiled tunnel calls per read, write or frame: C calls from there.
    cpdef get_buffer(self, sizehint)
    cpdef buffer_updated(self, nbytes)
    @cython.locals(frame=Frame)
    cpdef next_event(self)
    cpdef data_to_send(self)
    @cython.locals(stream=_Stream, size=Py_ssize_t, allowed=Py_ssize_t)
    cpdef send_data(self, long long stream_id, data, bint end=*)
    @cython.locals(stream=_Stream)
    cpdef consumed(self, long long stream_id, long long nbytes)
    cpdef bint has_stream(self, long long stream_id)
    @cython.locals(stream=_Stream)
    cpdef long long send_buffered(self, long long stream_id)
    @cython.locals(stream=_Stream)
    cpdef set_sink(self, long long stream_id, sink)
    @cython.locals(stream=_Stream)
    cpdef end_stream(self, long long stream_id)
    cpdef reset_stream(self, long long stream_id, code, reason)

    cdef _handle(self, Frame frame)
    @cython.locals(stream=_Stream, size=Py_ssize_t)
    cdef _on_data(self, long long stream_id, bytes payload, int end)
    @cython.locals(stream=_Stream)
    cdef _on_window(self, long long stream_id, long long increment)
    cdef _on_open(self, long long stream_id, bytes payload)
    cdef _on_goaway(self, long long last_stream_id, object code, object reason)
    cdef _refuse_open(self, long long stream_id, object code, str reason)
    cdef _replied(self, Py_ssize_t nbytes)
    cdef bint _idle_frame(self, str what) except -1
    cdef bint _flood(self, object reason) except -1
    cdef _decode_json(self, bytes payload, str what)
    cdef bint _is_local(self, long long stream_id)
    cdef _check_seen(self, long long stream_id)
    @cython.locals(stream=_Stream)
    cdef _Stream _known(self, long long stream_id, bint local=*)
    @cython.locals(stream=_Stream)
    cdef _Stream _stream_for_app(self, long long stream_id)
    cdef _check_open(self)
    cdef Py_ssize_t _grow_stream_window(self, long long stream_id) except -1
    @cython.locals(allowed=Py_ssize_t)
    cdef _flush_stream(self, _Stream stream)
    @cython.locals(stream=_Stream)
    cdef _flush_blocked(self)
    cdef _local_end(self, _Stream stream)
    cdef _remote_end(self, _Stream stream, bint notify=*)
    cdef _remove(self, long long stream_id)
    cdef _stream_error(self, long long stream_id, object code, str reason)
    cdef _fail(self, object code, str reason)
    cdef _connection_lost(self, str reason)
    cdef _terminate(self, object code, str reason)
