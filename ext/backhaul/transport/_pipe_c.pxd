# Types of the compiled socket pipe. The source is _pipe_c.py, a symlink to
# src/backhaul/transport/_pipe_py.py; this augmenting .pxd turns _PipeCore into a cdef class.
# Fields stay public (subclasses in relay/tcp_edge.py and connector/http_target.py, and the
# owners' session logs, read them); the tunnel is typed, so its per-write methods are C calls.

cimport cython
from backhaul.transport._tunnel_c cimport _TunnelCore


cdef class _PipeCore:
    # The FlowControl of the stream (socket write-buffer marks).
    cdef public object flow
    # What the stream is, for its log line: app, client, target, request id.
    cdef public dict labels
    # Called once with the pipe when the stream ended, or None.
    cdef public object on_done
    # The tunnel the stream is on, or None before it is opened.
    cdef public _TunnelCore tunnel
    # The stream's id on that tunnel (0: none yet).
    cdef public long long stream_id
    # The TCP transport, or None before connection_made.
    cdef public object transport
    # Bytes socket -> tunnel, and tunnel -> socket.
    cdef public long long bytes_up
    cdef public long long bytes_down
    # time.monotonic() at construction.
    cdef public double started
    # How the stream ended, in words, or None while it runs.
    cdef public object result
    # How it ended as a wire ErrorCode (NO_ERROR: completed).
    cdef public object code
    # The stream was accepted and bytes flow.
    cdef public bint started_stream
    # The process's shared read buffer; valid only inside buffer_updated.
    cdef public object _buffer
    # Bytes from the tunnel written while the socket was paused; credited on resume.
    cdef public long long _owed
    # The socket's write buffer is above its high mark.
    cdef public bint _write_paused
    # The socket sent EOF / the peer ended the stream and we shut our write side.
    cdef public bint _socket_eof
    cdef public bint _stream_eof
    # Bytes read before the stream was accepted (at most one read), or None.
    cdef public object _held
