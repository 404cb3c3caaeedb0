"""Coverage-guided fuzzing of the C frame parser against the pure-Python one (atheris; not run by pytest).

    pip install atheris
    python tests/fuzz_frames.py -max_total_time=300

Each input is parsed whole and cut at a point the input chooses, with a limit it chooses, by both
parsers; any difference, exception or crash stops the run. Coverage is that of the Python parser,
whose branches mirror the C parser's. For memory errors, build the extension with
``-fsanitize=address,undefined`` and run with the sanitizer's runtime preloaded.
"""

from __future__ import annotations

import sys

import atheris

from pywsserver.protocols import _frames

atheris.instrument_all()


def one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    limit = int.from_bytes(data[:2], "big")
    cut = data[2] % (len(data) - 2)
    stream = data[3:]
    for piece in (stream, stream[:cut], bytearray(stream[cut:])):
        expected = _frames.parse_frames_python(piece, limit)
        answer = _frames.parse_frames(piece, limit)
        if answer != expected:
            raise AssertionError(f"C {answer!r} != Python {expected!r} for {bytes(piece)!r} limit {limit}")


if __name__ == "__main__":
    if not _frames.SPEEDUPS:
        raise SystemExit("the C speedup is not built")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
