"""Frame codec throughput, Cython build vs pure twin (pytest-benchmark).

Each round encodes or decodes a batch of BATCH frames; frames/s = BATCH / round time.
Rounds are few so the module stays a quick smoke in the test suite; run
bench/codec_table.py for the numbers to quote.
"""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.bench_only

BATCH = 2000
SIZES = {"small": 64, "data64k": 64 * 1024}


@pytest.fixture(params=["_framing_c", "_framing_py"], ids=["cython", "python"])
def impl(request):
    return importlib.import_module(f"backhaul.protocol.{request.param}")


def _wire(impl, size: int, count: int) -> bytes:
    encoder = impl.FrameEncoder()
    payload = bytes(size)
    for i in range(count):
        encoder.data(2 + 2 * (i % 64), payload)
    return bytes(encoder.take())


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_encode(benchmark, impl, size):
    payload = bytes(SIZES[size])
    count = BATCH if size == "small" else BATCH // 20

    def encode():
        encoder = impl.FrameEncoder()
        for i in range(count):
            encoder.data(2, payload)
        return encoder.take()

    out = benchmark.pedantic(encode, rounds=5, iterations=1, warmup_rounds=1)
    assert len(out) == count * (12 + SIZES[size])
    benchmark.extra_info["frames_per_round"] = count


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_decode(benchmark, impl, size):
    count = BATCH if size == "small" else BATCH // 20
    wire = _wire(impl, SIZES[size], count)

    def decode():
        decoder = impl.FrameDecoder()
        decoder.feed(wire)
        n = 0
        next_frame = decoder.next_frame
        while next_frame() is not None:
            n += 1
        return n

    assert benchmark.pedantic(decode, rounds=5, iterations=1, warmup_rounds=1) == count
    benchmark.extra_info["frames_per_round"] = count
