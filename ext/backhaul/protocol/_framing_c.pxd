# Types of the compiled frame codec. The source is _framing_c.py, a symlink to
# src/backhaul/protocol/_framing_py.py; this augmenting .pxd turns its classes into
# cdef classes and its helpers into C functions. Nothing here changes behaviour.

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from libc.string cimport memcpy, memmove


@cython.final
@cython.freelist(64)
cdef class Frame:
    # FrameType value; an int so unknown values survive hand-built frames.
    cdef readonly int type
    # Header flags byte (Flag.END on DATA).
    cdef readonly int flags
    # Stream id, or the flow id of a DATAGRAM; 0 addresses the tunnel.
    cdef readonly unsigned int stream_id
    # The payload, copied out of the receive buffer exactly once.
    cdef readonly bytes payload


cdef Frame _new_frame(int ftype, int flags, unsigned int sid, bytes payload)


@cython.final
cdef class FrameDecoder:
    # Largest payload accepted on any frame (<= constants.MAX_PAYLOAD).
    cdef Py_ssize_t _max_payload
    # Capacity the buffer returns to once drained: one largest frame plus one read.
    cdef Py_ssize_t _base
    # Receive buffer; bytes [_start, _end) are unread. Replaced, never resized in place.
    cdef bytearray _buf
    # Read cursor: offset of the first byte not yet returned as a frame.
    cdef Py_ssize_t _start
    # Write cursor: offset just past the last received byte.
    cdef Py_ssize_t _end
    # The FrameError that poisoned this decoder, or None.
    cdef object _error
    # Frames returned by next_frame(), for metrics.
    cdef readonly unsigned long long frames

    cdef _raise_if_failed(self)
    cdef _fail(self, str message, int code)
    cdef _reserve(self, Py_ssize_t n)
    cdef _check_header(self, int ftype, int flags, int reserved, unsigned int sid, Py_ssize_t length)
    cpdef feed(self, data)
    cpdef get_buffer(self, sizehint)
    cpdef buffer_updated(self, nbytes)
    cpdef eof(self)
    cpdef next_frame(self)


cdef object _check_stream(object stream_id, bint allow_zero=*)
cdef object _check_code(object code)
cdef Py_ssize_t _nbytes(object payload) except -1
cdef bytes _encode_reason(object reason)


@cython.final
cdef class FrameEncoder:
    # Largest DATA payload per frame; data() splits longer payloads.
    cdef Py_ssize_t _max_payload
    # Frames encoded since the last take(); handed over whole, never copied.
    cdef bytearray _out
    # Frames encoded so far, for metrics.
    cdef readonly unsigned long long frames

    cdef _put(self, int ftype, int flags, unsigned int sid, object payload, Py_ssize_t offset, Py_ssize_t length)
    cdef _small(self, int ftype, unsigned int sid, object payload, str what)
    cdef _ping(self, int ftype, object opaque, str what)
    cpdef take(self)
    cpdef data(self, stream_id, payload, end=*)
