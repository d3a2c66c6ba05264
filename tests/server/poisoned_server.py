"""A test launcher: ``nemotron-fast serve`` whose engine hits a CUDA-style fatal error on any request whose prompt
contains ``POISON`` (the error a poisoned CUDA context raises). Used by test_engine_worker.py only."""

from __future__ import annotations

import sys

from nemotron_fast.engine import Engine
from nemotron_fast.pipeline import Pipeline
from nemotron_fast.server.__main__ import main

_poisoned: set[str] = set()
_engine_request = Pipeline.engine_request
_denoise = Engine._denoise


def engine_request(self, prep, request_id, **kw):  # type: ignore[no-untyped-def]
    if "POISON" in prep.params.prompt:
        _poisoned.add(request_id)
    return _engine_request(self, prep, request_id, **kw)


def denoise(self, rows, *args, **kwargs):  # type: ignore[no-untyped-def]
    if any(r.rid in _poisoned for r in rows):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return _denoise(self, rows, *args, **kwargs)


Pipeline.engine_request = engine_request  # type: ignore[method-assign]
Engine._denoise = denoise  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
