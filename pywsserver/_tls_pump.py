"""The TLS pump: ``wss://`` on asyncio over a plain TCP transport and an ``ssl.SSLObject``.

Why: asyncio's own TLS layer (``loop.connect_accepted_socket(..., ssl=...)``)
gives every connection a 256 KiB receive buffer of its own, which made a held
TLS connection cost about 290 KiB. The pump reads the ciphertext into one
buffer shared by every TLS connection of the event loop and decrypts into the
read buffer plain connections share: a held connection costs what OpenSSL
keeps (see ``docs/performance.md`` for the figures).

Theory of operation
-------------------
`TLSPump` sits between asyncio's plain socket transport and the connection's
driver (`pywsserver._asyncio_driver.ProtocolDriver`). To the transport it is
the protocol; to the driver it is the transport. In between, an
``ssl.SSLObject`` over two ``ssl.MemoryBIO`` objects does the TLS:

* In: a read lands in the shared ciphertext buffer and goes into the
  incoming BIO, at most ``_PIECE`` bytes at a time; after each piece the
  plaintext is read out of the ``SSLObject`` into the driver's (shared) read
  buffer, and handed to the driver (``buffer_updated``) once that buffer is
  nearly full or the read is used up. Whatever OpenSSL produces meanwhile
  (session tickets, alerts, key updates) goes out at once.
* Out: the driver's ``write`` encrypts with ``SSLObject.write``, again at
  most ``_PIECE`` bytes at a time, and the outgoing BIO's bytes go to the
  transport's ``write``: its buffer, its bounds and its
  ``pause_writing``/``resume_writing`` (passed on to the driver) are the
  flow control, exactly as for a plain connection.
* Pausing: while the driver has asked to stop reading, no plaintext reaches
  it; what is already read stays in OpenSSL or, not yet fed, in ``_unfed``,
  and the socket is not read. ``resume_reading`` hands it over in a callback
  of its own (never inside the caller), then reads the socket again.

The pump's life (``_state``):

===========  ==================================================  ===========
state        event                                               next state
===========  ==================================================  ===========
HANDSHAKING  the handshake completes: the pump holds the         OPEN
             plaintext (paused) until the driver has set up the
             connection and calls ``resume_reading``
HANDSHAKING  the handshake fails (bad bytes, alert), the peer    CLOSED
             leaves, the timeout passes, or ``abort``
OPEN         ``close`` (close_notify, best effort: it is not     CLOSED
             waited for), ``abort``, a TLS error (reported,
             then the socket is aborted), or the socket is lost
===========  ==================================================  ===========

The peer's end of the stream, clean (its close_notify) or not (the socket's
EOF without one), reaches the driver as ``eof_received`` once every byte
before it has been handed over; the driver then closes. Client-initiated
renegotiation is refused by OpenSSL 3 unless a context allows it
(``ssl.OP_NO_RENEGOTIATION`` on a context refuses it on older OpenSSL too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from typing import Any, Protocol

__all__ = ["TLSPump"]

#: Bytes fed to or taken from an ``ssl.MemoryBIO`` at a time. A memory BIO keeps the largest size it
#: ever held, so this bounds what a connection keeps after a large message: measured 28 KiB a BIO
#: after 1 MiB went through in 16 KiB pieces, 101 KiB in 64 KiB pieces, 1,042 KiB in one piece.
_PIECE = 16384
#: Plaintext is handed to the driver once its read buffer has less room than one TLS record's worth.
_ROOM = 16384 + 256

HANDSHAKING, OPEN, CLOSED = 0, 1, 2

_buffers = threading.local()


def _cipher_buffer() -> memoryview:
    """One ciphertext read buffer for every TLS connection of the calling thread's event loop.

    Its bytes are copied into the connection's incoming BIO (or kept in ``_unfed``) before the
    read callback returns, so the connections of one loop can share it.
    """
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(262144))
    return view


class TLSApp(Protocol):
    """What the pump asks of the protocol above it (the asyncio driver)."""

    def get_buffer(self, sizehint: int) -> memoryview:
        """The buffer plaintext is read into (the event loop's shared read buffer)."""

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` of plaintext are at the start of the buffer."""

    def eof_received(self) -> bool | None:
        """The peer's end of the stream; a false return asks the pump to close."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed."""

    def pause_writing(self) -> None:
        """The transport's write buffer is above its bound."""

    def resume_writing(self) -> None:
        """The transport's write buffer drained."""

    def tls_error(self, error: BaseException) -> None:
        """A TLS error after the handshake (an alert, a bad record): the pump aborts the socket."""


class TLSPump(asyncio.BufferedProtocol, asyncio.Transport):
    """TLS between a plain asyncio socket transport (below) and a driver (above); see the module."""

    __slots__ = (
        "_app",
        "_ended",
        "_eof",
        "_handshake",
        "_incoming",
        "_loop",
        "_outgoing",
        "_paused",
        "_resuming",
        "_secured",
        "_ssl",
        "_state",
        "_tcp",
        "_unfed",
        "_view",
    )

    def __init__(self, context: ssl.SSLContext, app: TLSApp, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._app = app
        self._loop = loop
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._state = HANDSHAKING
        self._handshake: asyncio.Future[None] | None = loop.create_future()
        self._tcp: asyncio.Transport | None = None
        self._view = app.get_buffer(-1)
        self._paused = False  # the driver asked to stop reading (or the handshake's hold)
        self._resuming = False  # a `_resume` callback is scheduled
        self._secured = False  # the handshake completed: the driver is connected
        self._eof = False  # the socket's EOF was seen: it is not read again
        self._ended = False  # the end of the stream was handed to the driver (once)
        self._unfed = b""  # ciphertext read while paused, not yet in the incoming BIO

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The connection's ``ssl.SSLObject`` (version, cipher, peer certificate, ALPN)."""
        return self._ssl

    async def handshake(self, timeout: float) -> None:
        """Wait for the TLS handshake, at most ``timeout`` seconds; raises what ended it otherwise.

        Raises `TimeoutError`, ``ssl.SSLError`` or `OSError` (``ConnectionResetError`` when the peer
        left); the caller then aborts the pump.
        """
        future = self._handshake
        if future is None:  # ended before anyone waited (it is set to None only when it did)
            raise ConnectionResetError("the TLS connection ended before its handshake completed")
        timer = self._loop.call_later(timeout, self._handshake_done, TimeoutError("TLS handshake timed out"))
        try:
            await future
        finally:
            timer.cancel()
            self._handshake = None

    def _handshake_done(self, error: BaseException | None) -> None:
        future = self._handshake
        if error is not None and self._state == HANDSHAKING:
            self._state = CLOSED
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    # ---------------------------------------------------- the transport below

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The socket's transport: the handshake starts with the client's first bytes."""
        self._tcp = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        """The shared ciphertext buffer."""
        return _cipher_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """Ciphertext arrived: feed it and hand over the plaintext."""
        if self._unfed:  # not expected (the socket is not read while bytes wait): kept in order
            self._unfed += bytes(_cipher_buffer()[:nbytes])
            return
        self._pump_in(_cipher_buffer(), nbytes)

    def eof_received(self) -> bool:
        """The socket's EOF: an end without close_notify, passed on after the bytes before it."""
        self._eof = True
        if self._state == HANDSHAKING:
            self._handshake_done(ConnectionResetError("the peer closed during the TLS handshake"))
        elif self._state == OPEN:
            if self._unfed:  # not expected, as above: into OpenSSL whole, before the end
                self._incoming.write(self._unfed)
                self._unfed = b""
            self._incoming.write_eof()
            if not self._paused:
                self._pump_in(b"", 0)
        return True  # the pump closes the transport (after the driver's decision)

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed: tell the driver (or end the handshake)."""
        state, self._state = self._state, CLOSED
        if state == HANDSHAKING:
            self._handshake_done(exc or ConnectionResetError("the TLS connection was lost during its handshake"))
        if self._secured:
            self._secured = False
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        """The socket's write buffer is full: the driver stops."""
        if self._state == OPEN:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        """The socket's write buffer drained: the driver goes on."""
        if self._state == OPEN:
            self._app.resume_writing()

    # ------------------------------------------------------------------ in

    def _pump_in(self, source: memoryview | bytes, end: int) -> None:
        """Feed ``source[:end]`` (ciphertext) piece by piece; hand the plaintext over as it comes."""
        incoming = self._incoming
        position = 0
        filled = 0
        room = len(self._view) - _ROOM
        while True:
            if self._state == HANDSHAKING:
                if position >= end:
                    return
                step = min(end, position + _PIECE)
                incoming.write(source[position:step])
                position = step
                self._shake()
                continue
            if self._state != OPEN or self._paused or self._ended:
                break
            filled = self._decrypt(filled)
            if filled < 0:  # the end of the stream, or an error: dealt with
                return
            if filled and (filled > room or position >= end):
                self._app.buffer_updated(filled)
                filled = 0
                continue  # more plaintext may wait in OpenSSL; the driver may have paused or closed
            if position >= end:
                break
            step = min(end, position + _PIECE)
            incoming.write(source[position:step])
            position = step
        if position < end and self._state == OPEN:
            self._unfed = bytes(source[position:end])

    def _decrypt(self, filled: int) -> int:
        """Read plaintext into the driver's buffer from ``filled`` on; the new fill, or -1 at the end.

        At the end of the stream (close_notify or EOF) what was read is handed over, then the
        driver's ``eof_received``; on a TLS error the error is reported and the socket aborted.
        """
        view = self._view
        size = len(view)
        read = self._ssl.read
        incoming = self._incoming
        ended = False
        try:
            while filled < size and (incoming.pending or self._ssl.pending() or incoming.eof):
                # With a buffer, ``read`` returns the count read into it (typeshed says bytes).
                count: int = read(size - filled, view[filled:])  # type: ignore[assignment]
                if not count:  # close_notify (OpenSSL's "zero return")
                    ended = True
                    break
                filled += count
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # a record not complete yet (memory BIOs never want a write)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            ended = True  # close_notify, or the socket's EOF without one
        except ssl.SSLError as error:
            self._flush()
            self._fail(error)
            return -1
        self._flush()  # what reading produced: session tickets, key updates, alerts
        if not ended:
            return filled
        if filled:
            self._app.buffer_updated(filled)
        if self._state == OPEN and not self._ended:
            self._ended = True
            if not self._app.eof_received():
                self.close()
        return -1

    def _shake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as error:
            self._flush()  # the alert that says why, if the socket takes it now
            self._handshake_done(error)
            return
        self._flush()
        self._state = OPEN
        self._secured = True
        # Held until the driver has the connection set up (its ``resume_reading``).
        self._paused = True
        if self._tcp is not None:
            self._tcp.pause_reading()
        self._handshake_done(None)

    def _resume(self) -> None:
        """Hand over what was held while paused, then read the socket again."""
        self._resuming = False
        if self._paused or self._state != OPEN:
            return
        unfed, self._unfed = self._unfed, b""
        self._pump_in(unfed, len(unfed))
        tcp = self._tcp
        if not self._paused and self._state == OPEN and tcp is not None and not self._eof:
            tcp.resume_reading()

    def _fail(self, error: BaseException) -> None:
        """A TLS error once open: report it, drop the socket."""
        self._state = CLOSED
        self._app.tls_error(error)
        if self._tcp is not None:
            self._tcp.abort()

    # ------------------------------------------------------------------ out

    def _flush(self) -> None:
        """Hand what OpenSSL wrote to the socket's transport."""
        outgoing = self._outgoing
        if outgoing.pending and self._tcp is not None:
            self._tcp.write(outgoing.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and write it (dropped once the connection is closing)."""
        if self._state != OPEN:
            return
        encrypt = self._ssl.write
        try:
            if len(data) <= _PIECE:
                encrypt(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), _PIECE):
                    encrypt(view[start : start + _PIECE])
                    self._flush()
        except ssl.SSLError as error:  # nothing a server writes can want a read: renegotiation is refused
            self._fail(error)
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        """Write each piece in order."""
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        """No: TLS has no half-close that a WebSocket server would use."""
        return False

    def close(self) -> None:
        """Say close_notify (best effort, not waited for), then close once the buffered bytes are written."""
        if self._state == CLOSED:
            return
        opened = self._state == OPEN
        self._state = CLOSED
        self._handshake_done(ConnectionResetError("the TLS connection was closed during its handshake"))
        if opened:
            # It wants the peer's close_notify next, which is not waited for.
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()
            self._flush()
        if self._tcp is not None:
            self._tcp.close()

    def abort(self) -> None:
        """Drop the connection now, unsaid and unsent."""
        self._state = CLOSED
        future = self._handshake
        if future is not None and not future.done():
            future.cancel()  # nobody may wait for it any more: no "exception never retrieved"
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        """Whether the connection is closing or closed."""
        return self._state == CLOSED or self._tcp is None or self._tcp.is_closing()

    def pause_reading(self) -> None:
        """Hand the driver no more plaintext, read the socket no more."""
        if self._paused:
            return
        self._paused = True
        if self._tcp is not None and not self._eof:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        """Hand over what waited (in a callback of its own), then read the socket again."""
        if not self._paused:
            return
        self._paused = False
        if not self._resuming:
            self._resuming = True
            self._loop.call_soon(self._resume)

    def is_reading(self) -> bool:
        """Whether plaintext is handed over as it comes."""
        return not self._paused and self._state == OPEN

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The socket transport's write buffer bounds (ciphertext bytes)."""
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        """Ciphertext bytes waiting in the socket transport's buffer."""
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``ssl_object``, ``peercert``, ``cipher``, ``compression`` from the TLS session, the rest from the socket."""
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "compression":
            return self._ssl.compression()
        return self._tcp.get_extra_info(name, default) if self._tcp is not None else default
