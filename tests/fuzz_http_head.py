"""Coverage-guided fuzzing of the C request-head parse against the Python one (atheris; not run by pytest).

    pip install atheris
    python tests/fuzz_http_head.py -max_total_time=300

Each input is parsed by both (``_speedups.parse_head`` and ``parse_request_head_python``): wherever the
C answers, it must answer what the Python parse builds, and wherever the Python parse refuses the head,
the C must leave it to it (``None``); any difference, exception or crash stops the run. For memory
errors, build the extension with ``-fsanitize=address,undefined`` and run with the sanitizer's runtime
preloaded.
"""

from __future__ import annotations

import sys

import atheris

from pywsserver.protocols import _http

atheris.instrument_all()


def one_input(data: bytes) -> None:
    assert _http._parse_head is not None
    answer = _http._parse_head(data)
    try:
        request = _http.parse_request_head_python(data)
    except _http.BadRequest:
        if answer is not None:
            raise AssertionError(f"C {answer!r} for a head the Python parse refuses: {data!r}") from None
        return
    if answer is not None:
        expected = (
            request.method,
            request.target,
            request.path,
            request.query,
            request.version,
            request.headers.raw,
            request.headers._index,
        )
        if answer != expected:
            raise AssertionError(f"C {answer!r} != Python {expected!r} for {data!r}")


if __name__ == "__main__":
    if _http._parse_head is None:
        raise SystemExit("the C speedup is not built")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
