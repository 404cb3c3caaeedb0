"""The asyncio driver's own transport for plain TCP on asyncio's selector event loop.

asyncio's `_SelectorSocketTransport` is written in Python for every kind of
protocol, and a connection pays for that generality at each step: at its start
(a ``TransportSocket``, both addresses looked up, an entry in the loop's weak
table of transports, ``connection_made`` and the reader's registration in two
loop callbacks, the registration raising and catching a ``KeyError``), at each
read (four Python frames: ``_read_ready``, the read callback, ``get_buffer``,
``buffer_updated``) and at its end (two look-ups that raise ``KeyError`` again,
and a reference cycle, transport to bound method to transport, that only the
garbage collector frees, with the socket, its dict and its addresses).

`SocketTransport` does what the driver needs and no more: the socket is
registered with the loop's selector at once, a read goes straight into the
driver's shared buffer and on to ``buffer_updated`` (two Python frames), the
addresses are looked up when first asked for, and nothing refers back to the
transport once its connection is lost. It keeps the semantics of asyncio's
transport that the driver relies on: write buffering past what the socket
takes, with ``pause_writing``/``resume_writing`` at the same bounds;
``pause_reading``/``resume_reading``; ``close`` after the buffer is written and
``abort`` at once; ``connection_lost`` in a callback of its own after either;
``eof_received`` and errors as asyncio reports them. The broadcast and steady
paths' direct ``send`` (the C speedups) reads ``_buffer``, ``_conn_lost`` and
``_sock`` as it does on asyncio's transport.

The socket is taken as the server's acceptors make it: non-blocking, with
``TCP_NODELAY`` set (asyncio's transport sets it again; this one does not).

The loop's internals it relies on: ``loop._selector``, and the ``(reader,
writer)`` pair of `asyncio.Handle` that the loop keeps as each registered file
descriptor's data and runs from ``_process_events`` (the same from Python 3.8
to 3.13). `SocketTransport.selector_of` finds none on any other loop (uvloop,
the proactor, a selector loop with its own ``_process_events``), and the driver
then takes the loop's transport.

Measured: see ``docs/performance.md`` (instructions per handshake and per
echoed message under callgrind, ``benchmarks/instructions.py``).
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import socket
from asyncio import trsock
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._asyncio_driver import ProtocolDriver

__all__ = ["SocketTransport"]

_asyncio_logger = logging.getLogger("asyncio")  # where asyncio's own transports report what this one does too
_server_logger = logging.getLogger("pywsserver.server")  # what is the server's business

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
#: asyncio's: writes to a lost connection are counted, and logged from this many on.
_LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
_DEFAULT_HIGH = 64 * 1024  # asyncio's default write buffer bounds: 64 KiB, and a quarter of that


class SocketTransport(asyncio.Transport):
    """A plain TCP connection's transport on asyncio's selector loop, for the asyncio driver."""

    # No __slots__: the C speedups read ``_buffer`` and ``_conn_lost`` in the instance's dict, as on
    # asyncio's transport.

    @staticmethod
    def selector_of(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector | None:
        """``loop``'s selector where the transport can serve on ``loop``, else ``None`` (uvloop, the
        proactor: the caller takes asyncio's transport). Asked once per event loop (`_LoopShared`)."""
        base = asyncio.selector_events.BaseSelectorEventLoop
        # A loop that dispatches the selector's events its own way is left its own transport.
        dispatch = getattr(type(loop), "_process_events", None)
        if not isinstance(loop, base) or dispatch is not getattr(base, "_process_events", None):
            return None
        selector = getattr(loop, "_selector", None)
        return selector if isinstance(selector, selectors.BaseSelector) else None

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        selector: selectors.BaseSelector,
        sock: socket.socket,
        protocol: ProtocolDriver,
        view: memoryview,
        high: int = _DEFAULT_HIGH,
    ) -> None:
        """A transport for ``sock`` on ``loop`` (whose `selector_of` is ``selector``), reading into
        ``view`` for ``protocol`` and registered for reading at once, its write buffer bounded by
        ``high`` and a quarter of it (as `set_write_buffer_limits` would set them)."""
        # BaseTransport.__init__ is not called: its ``_extra`` dict is not used (`get_extra_info`).
        self._loop = loop
        self._selector = selector
        self._sock = sock  # kept once closed (asyncio's transport drops it): nothing it holds refers back
        self._fd = sock.fileno()
        self._protocol: Any = protocol  # a `ProtocolDriver`; None once the connection is lost
        self._lost = False  # connection_lost called, the socket closed
        self._view = view
        self._buffer = bytearray()
        self._conn_lost = 0  # set when connection_lost is scheduled; then counts the writes ignored
        self._closing = False
        self._paused = False  # pause_reading
        self._eof = False  # write_eof
        self._read_eof = False  # the peer's EOF read: nothing more to read, whatever resume_reading says
        self._events = 0  # what the selector watches the socket for now
        self._high = high
        self._low = high // 4
        self._protocol_paused = False  # pause_writing called, resume_writing not yet
        self._addresses: dict[str, Any] | None = None
        self._set_events(_READ)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<SocketTransport {state} fd={self._fd} buffered={len(self._buffer)}>"

    # ------------------------------------------------------------ the selector

    def _set_events(self, events: int) -> None:
        """Have the selector watch the socket for ``events`` (reads, writes, both or none).

        The handles hold bound methods of the transport and only the selector holds them, so that
        nothing refers back to the transport once it is unregistered. A handle already queued for
        this turn is not cancelled: `_read_ready` and `_write_ready` find they have nothing to do.
        """
        old = self._events
        if events == old:
            return
        selector = self._selector
        fd = self._fd
        if not events:
            self._events = 0  # first: a selector that fails below has dropped the descriptor anyway
            # A try costs nothing here when nothing is raised; a test of the selector's map or
            # contextlib.suppress would cost about 2,000 instructions per connection.
            try:  # noqa: SIM105
                selector.unregister(fd)
            except KeyError:  # not there once the loop has closed, or after a failed registration
                pass
            return
        loop = self._loop
        if not old:
            reader = asyncio.Handle(self._read_ready, (), loop, None) if events & _READ else None
            writer = asyncio.Handle(self._write_ready, (), loop, None) if events & _WRITE else None
            try:
                selector.register(fd, events, (reader, writer))
            except KeyError:
                # A stale entry for this number: a descriptor closed while registered, which the kernel
                # forgot with it. Dropped and registered again, so that the kernel watches this one;
                # said, as whoever closed it registered may still remove this registration later.
                _server_logger.warning("descriptor %d was still registered with the event loop: registered again", fd)
                selector.unregister(fd)
                selector.register(fd, events, (reader, writer))
            self._events = events
            return
        reader, writer = selector.get_key(fd).data  # the direction that stays keeps its handle
        if not events & _READ:
            reader = None
        elif reader is None:
            reader = asyncio.Handle(self._read_ready, (), loop, None)
        if not events & _WRITE:
            writer = None
        elif writer is None:
            writer = asyncio.Handle(self._write_ready, (), loop, None)
        try:
            selector.modify(fd, events, (reader, writer))
        except BaseException:
            self._events = 0 if fd not in selector.get_map() else old
            raise
        self._events = events

    def _wanted(self) -> int:
        """What the selector should watch for: reads unless closing, paused or at the peer's EOF, writes
        while buffered."""
        events = 0
        if not (self._closing or self._paused or self._read_eof):
            events = _READ
        if self._buffer and not self._conn_lost:
            events |= _WRITE
        return events

    # ------------------------------------------------------------------ reads

    def _read_ready(self) -> None:
        if self._conn_lost or self._closing or self._paused:  # a read event queued before a pause or close
            return
        try:
            nbytes = self._sock.recv_into(self._view)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not nbytes:
            self._on_eof()
            return
        try:
            self._protocol.buffer_updated(nbytes)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _on_eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if keep_open:  # the protocol may write on, but there is nothing more to read
            self._read_eof = True
            self._set_events(self._wanted())
        else:
            self.close()

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading`."""
        if self._closing or self._paused:
            return
        self._paused = True
        self._set_events(self._wanted())

    def resume_reading(self) -> None:
        """Read again after `pause_reading`."""
        if self._closing or not self._paused:
            return
        self._paused = False
        self._set_events(self._wanted())

    def is_reading(self) -> bool:
        """Whether the transport reads (not closing, not paused, not at the peer's EOF)."""
        return not (self._closing or self._paused or self._read_eof)

    # ----------------------------------------------------------------- writes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, buffering what the socket does not take now."""
        if type(data) is not bytes:  # what the core writes: checked with one comparison
            if not isinstance(data, bytearray | memoryview):
                raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
            if isinstance(data, memoryview):
                data = data.cast("B")  # lengths and slices in bytes, whatever the item size
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._conn_lost:
            if self._conn_lost >= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                _asyncio_logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        buffer = self._buffer
        if not buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            if sent == len(data):
                return
            buffer += memoryview(data)[sent:]
            self._set_events(self._wanted())
        else:
            buffer += data
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        """Send each of ``list_of_data`` in turn (joined: one ``send``)."""
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        if self._conn_lost:
            return
        buffer = self._buffer
        sock = self._sock
        try:
            sent = sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            buffer.clear()
            self._fatal_error(exc, "Fatal write error on socket transport")
            return
        if sent:
            del buffer[:sent]
        self._maybe_resume_protocol()  # may write more, or fail the connection (then lost with its error)
        if buffer or self._conn_lost:
            return
        if self._closing:
            self._conn_lost += 1
            self._set_events(0)
            self._call_connection_lost(None)
            return
        self._set_events(self._wanted())
        if self._eof:
            sock.shutdown(socket.SHUT_WR)

    def write_eof(self) -> None:
        """Close the write side once the buffer is written."""
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer and not self._lost:
            self._sock.shutdown(socket.SHUT_WR)

    def can_write_eof(self) -> bool:
        """Always: TCP can."""
        return True

    def get_write_buffer_size(self) -> int:
        """The bytes buffered."""
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The ``(low, high)`` bounds of `set_write_buffer_limits`."""
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Call ``pause_writing`` above ``high`` bytes buffered, ``resume_writing`` at ``low`` or below
        (asyncio's defaults and checks)."""
        if high is None:
            high = _DEFAULT_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high = high
        self._low = low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if len(self._buffer) <= self._high or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._exception_handler("protocol.pause_writing() failed", exc)

    def _maybe_resume_protocol(self) -> None:
        if not self._protocol_paused or len(self._buffer) > self._low:
            return
        self._protocol_paused = False
        try:
            self._protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._exception_handler("protocol.resume_writing() failed", exc)

    # -------------------------------------------------------------------- end

    def is_closing(self) -> bool:
        """Whether `close` or `abort` was called (or the connection failed)."""
        return self._closing

    def close(self) -> None:
        """Stop reading; once the buffer is written, close the socket and call ``connection_lost``."""
        if self._closing:
            return
        self._closing = True
        if self._buffer:  # `_write_ready` ends the connection once the buffer is written
            self._set_events(self._wanted())
            return
        self._conn_lost += 1
        self._set_events(0)
        self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        """Drop the buffer, close the socket and call ``connection_lost`` (in a callback)."""
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        self._buffer.clear()
        self._closing = True
        self._conn_lost += 1
        self._set_events(0)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):  # the peer's doing: asyncio logs it only in debug mode
            if self._loop.get_debug():
                _asyncio_logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._exception_handler(message, exc)
        self._force_close(exc)

    def _exception_handler(self, message: str, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        protocol = self._protocol
        try:
            protocol.connection_lost(exc)
        finally:
            self._sock.close()
            self._protocol = None  # the protocol (the driver) holds the transport: no cycle left

    # ---------------------------------------------------------------- the rest

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname`` (looked up when first asked for, kept) and ``socket``."""
        addresses = self._addresses
        if addresses is None:
            addresses = self._addresses = {}
        if name in addresses:
            return addresses[name]
        sock = self._sock
        if name == "socket":
            value: Any = trsock.TransportSocket(sock)
        elif name == "peername":
            value = sockname(sock.getpeername)  # None once the socket is closed
        elif name == "sockname":
            value = sockname(sock.getsockname)
        else:
            return default
        addresses[name] = value
        return value

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol (a `ProtocolDriver`)."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol (``None`` once the connection is lost)."""
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol


def sockname(getter: Any) -> Any:
    """What ``getter`` (a socket's ``getpeername`` or ``getsockname``) gives, or ``None`` once the
    peer has gone or the socket is closed."""
    try:
        return getter()
    except OSError:
        return None
