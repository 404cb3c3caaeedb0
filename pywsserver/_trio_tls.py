"""The trio driver for TLS: `TrioDriver` with an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` objects.

Why: TLS on trio used to take the anyio stream driver (``_stream_driver``), whose
``TLSStream`` runs three tasks per connection (reader, writer, mailbox) and a
task switch per read and write. Here a TLS connection is served as a plain one
on trio is: one task, reads into the buffer every connection of the thread
shares, writes tried at once.

How, on top of `TrioDriver`:

* The handshake first, in the worker's task, bounded by ``tls_handshake_timeout``:
  ``do_handshake`` until it completes, the ciphertext it produces sent, the
  peer's read into the incoming BIO. A failure drops the socket and tells the
  core (`ConnectionCore._tls_failed`), as the other drivers do.
* In: a read lands in the buffer plain connections share and goes into the
  incoming BIO 16 KiB at a time (a memory BIO keeps the largest size it ever
  held); after each piece the plaintext is read into a second shared buffer
  and handed to the core as a plain read is. What the core does not take yet
  (an async handler runs, reading is paused) stays in OpenSSL, or, not fed
  yet, in ``_unfed``, and is handed over before the task next waits.
* Out: the core's writes are encrypted, 16 KiB at a time, and the ciphertext goes through
  `TrioDriver.write` (sent at once, or kept for the writer task, with the same
  bounds). A broadcast's frame takes the same way: ``flush_soon`` goes through
  the core's flush, and ``_pending`` is a list subclass, which the C broadcast
  path (``deliver_frames``), made for plain sockets, leaves alone.
* The end: a close the core asks for sends close_notify after the last bytes
  (best effort, not waited for); the peer's close_notify, or its end of the
  stream, is the end of the input.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Awaitable

import trio

from . import _core, _tls_pump
from ._trio_driver import TrioDriver, _read_buffer, _wait_readable, _wait_writable

__all__ = ["TrioTLSDriver"]

#: Bytes fed to or taken from an ``ssl.MemoryBIO`` at a time: a memory BIO keeps the largest size it
#: ever held (the asyncio TLS pump's measure, ``_tls_pump._PIECE``).
_PIECE = _tls_pump._PIECE

_buffers = threading.local()


def _plain_buffer() -> memoryview:
    """One plaintext buffer for every TLS connection of the calling thread's trio run (the ciphertext
    of a read stays in the shared read buffer while it is fed piece by piece)."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(262144))
    return view


class _CipherPending(list):  # type: ignore[type-arg]
    """`TrioDriver._pending` for a TLS connection: a list subclass, so that the C broadcast path,
    which sends a lone frame straight to a plain socket when ``_pending`` is an exact empty list,
    never sends plaintext on a TLS socket."""

    __slots__ = ()


class TrioTLSDriver(TrioDriver):
    """Drives a connection core over TLS from a non-blocking socket on trio; owns the socket."""

    __slots__ = ("_handshake_timeout", "_incoming", "_outgoing", "_shut", "_ssl", "_unfed")

    def __init__(
        self, core: _core.ConnectionCore, sock: socket.socket, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(core, sock)
        self._pending = _CipherPending()
        self._handshake_timeout = timeout
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._shut = False  # close_notify sent: nothing more is written
        self._unfed: bytes | memoryview = b""  # ciphertext read but not fed yet: the core stopped taking reads

    # ------------------------------------------------------------- writing

    def write(self, data: bytes) -> None:
        """The core's output, encrypted; the ciphertext sent now or kept, as `TrioDriver.write`."""
        if self._closed or self._lost or self._shut:
            return
        try:
            if len(data) <= _PIECE:
                self._ssl.write(data)
                self._send_cipher()
                return
            # A piece at a time, the ciphertext taken after each: a memory BIO keeps its largest size.
            outgoing = self._outgoing
            view = memoryview(data)
            cipher = []
            for start in range(0, len(view), _PIECE):
                self._ssl.write(view[start : start + _PIECE])
                cipher.append(outgoing.read())
        except ssl.SSLError:
            self._failed()
            return
        TrioDriver.write(self, b"".join(cipher))

    def _send_cipher(self) -> None:
        """Send what OpenSSL has produced (through `TrioDriver.write`: at once, or kept)."""
        cipher = self._outgoing.read()
        if cipher:
            TrioDriver.write(self, cipher)

    def flush_soon(self) -> None:
        """A broadcast's frame: through the core's flush and `write` (encrypted)."""
        self._core._flush()

    # ----------------------------------------------------------- the task

    def serve(self) -> Awaitable[None]:
        """The TLS handshake, then the connection as `TrioDriver` serves it."""
        return self._serve_tls()

    async def _serve_tls(self) -> None:
        core = self._core
        try:
            error = await self._handshake()
        except BaseException:  # cancelled (the server stops) during the handshake
            self.abort()
            core._socket_closed = core._stopped = True
            raise
        if error is not None:
            self.abort()
            core._tls_failed(error)
            return
        core._connection_secured(self._ssl)
        await TrioDriver.serve(self)

    def _read_first(self) -> None:
        # Bytes that came with the handshake's end are handed over by the task's first wait, before
        # it reads: a read first could be the end of the stream, which must come after them.
        if not (self._incoming.pending or self._ssl.pending()):
            TrioDriver._read_first(self)

    async def _handshake(self) -> BaseException | None:
        """The TLS handshake, bounded by ``tls_handshake_timeout``: ``None``, or why it failed."""
        view = _read_buffer()
        fd = self._fd
        try:
            with trio.fail_after(self._handshake_timeout):
                while True:
                    try:
                        self._ssl.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLError:
                        self._send_cipher()  # the alert that says why, before the socket is dropped
                        raise
                    else:
                        self._send_cipher()
                        return ConnectionResetError("the connection was lost") if self._lost else None
                    self._send_cipher()
                    while self._pending and not self._lost:
                        await _wait_writable(fd)
                        self._send_pending()
                    if self._lost:
                        return ConnectionResetError("the connection was lost")
                    await _wait_readable(fd)
                    try:
                        size = self._sock.recv_into(view, _PIECE)  # a piece at most: the BIO keeps its size
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not size:
                        return EOFError("the peer closed the connection during the TLS handshake")
                    self._incoming.write(view[:size])
        except (OSError, ssl.SSLError, trio.TooSlowError, trio.ClosedResourceError) as error:
            return error

    async def _wait(self) -> None:
        """As `TrioDriver._wait`, once what this connection still holds (plaintext in OpenSSL,
        ciphertext not fed yet) has been handed over."""
        if self._reading and (self._unfed or self._ssl.pending() or self._incoming.pending):
            unfed, self._unfed = self._unfed, b""
            if self._feed(unfed, len(unfed)):
                return
            if self._pending and not self._writing:
                return  # what that produced waits for the kernel: the task's loop opens the writer's group
        await TrioDriver._wait(self)

    def _read(self, view: memoryview) -> bool:
        """Read ciphertext once, and hand the plaintext to the core; ``True`` when the task has more
        to do than read (as `TrioDriver._read`)."""
        try:
            size = self._sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._failed()
            return True
        if not size:
            return self._end_of_input()
        return self._feed(view, size)

    def _feed(self, cipher: memoryview | bytes, size: int) -> bool:
        """Feed ``cipher[:size]`` to OpenSSL a piece at a time (a memory BIO keeps its largest size),
        the plaintext handed to the core as it comes; what the core does not take yet (it is busy,
        or has paused reading) is kept for the next wait. ``True`` when the task has more to do."""
        incoming = self._incoming
        position = 0
        while True:
            more = self._hand_over()
            if more or position >= size:
                break
            step = min(size, position + _PIECE)
            incoming.write(cipher[position:step])
            position = step
        if position < size:
            if isinstance(cipher, memoryview) and cipher.readonly:
                self._unfed = cipher[position:size]  # kept already: sliced, not copied again
            else:
                self._unfed = memoryview(bytes(cipher[position:size]))  # out of the shared read buffer
        return more

    def _hand_over(self) -> bool:
        """The plaintext OpenSSL has, to the core through the plaintext buffer, while the core takes
        reads; what OpenSSL produces meanwhile (session tickets, alerts) is sent. ``True`` when the
        task has more to do than read."""
        core = self._core
        view = _plain_buffer()
        more = False
        while not more and self._reading and (self._incoming.pending or self._ssl.pending()):
            try:
                size: int = self._ssl.read(len(view), view)  # type: ignore[assignment]
            except ssl.SSLWantReadError:  # a record not complete yet
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify (also read as 0 bytes, below)
                size = 0
            except ssl.SSLError as error:  # the peer's alert, a bad record: reported, the socket dropped
                core.log.debug("TLS error: %r", error)  # repr: an alert's text is the peer's, escaped
                _core.bad_input("TLS errors", f"{core._peer_text}: {error!r}", core._context())
                self._send_cipher()
                self._failed()
                return True
            if not size:  # the peer's close_notify: the end of its input
                self._send_cipher()
                return self._end_of_input()
            more = self._hand(view, size)
        self._send_cipher()
        return more or not self._reading  # paused: the next piece waits until reading resumes

    # ------------------------------------------------------- the core's asks

    def close_socket(self) -> None:
        """Close once what is pending is sent, close_notify last (not waited for)."""
        if not self._shut and not self._closed and not self._lost:
            self._shut = True
            with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's close_notify is not awaited
                self._ssl.unwrap()
            self._send_cipher()
        TrioDriver.close_socket(self)
