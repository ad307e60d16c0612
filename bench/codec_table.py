"""Print frames/s and MB/s of the frame codec, Cython build vs pure-Python twin.

Usage: .venv/bin/python bench/codec_table.py [--seconds S]
Decoding is measured the way a tunnel reads: 64 KiB socket reads through
get_buffer()/buffer_updated(), then next_frame() until None.
"""

from __future__ import annotations

import argparse
import importlib
import time

READ = 64 * 1024
BATCH_BYTES = 1024 * 1024
SIZES = [("small (16 B)", 16), ("1 KiB", 1024), ("DATA 64 KiB", 64 * 1024)]


def _best(fn, seconds: float) -> float:
    """Best time of repeated runs within the time budget."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            return best


def measure(impl, size: int, seconds: float) -> tuple[float, float]:
    per_take = max(1, BATCH_BYTES // (size + 12))
    count = max(50, min(200_000, (32 * 1024 * 1024) // (size + 12))) // per_take * per_take
    payload = bytes(size)

    def encode():
        # take() about once per MiB, as a tunnel does once per event-loop pass.
        encoder = impl.FrameEncoder()
        data = encoder.data
        take = encoder.take
        for _ in range(count // per_take):
            for _ in range(per_take):
                data(2, payload)
            take()

    encoder = impl.FrameEncoder()
    for _ in range(count):
        encoder.data(2, payload)
    wire = bytes(encoder.take())

    def decode():
        decoder = impl.FrameDecoder()
        next_frame = decoder.next_frame
        view_of = memoryview(wire)
        n = 0
        for pos in range(0, len(wire), READ):
            chunk = view_of[pos : pos + READ]
            buf = decoder.get_buffer(READ)
            buf[: len(chunk)] = chunk
            decoder.buffer_updated(len(chunk))
            while next_frame() is not None:
                n += 1
        assert n == count
        return n

    return count / _best(encode, seconds), count / _best(decode, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per cell")
    args = parser.parse_args()
    impls = []
    for name, label in (("_framing_c", "cython"), ("_framing_py", "python")):
        try:
            impls.append((label, importlib.import_module(f"backhaul.protocol.{name}")))
        except ImportError as exc:
            print(f"{label}: not available ({exc}); run tools/bootstrap.sh")
    print(f"{'build':<8} {'frame':<14} {'encode frames/s':>16} {'encode MB/s':>12} {'decode frames/s':>16} {'decode MB/s':>12}")
    for label, impl in impls:
        for title, size in SIZES:
            enc, dec = measure(impl, size, args.seconds)
            mb = (size + 12) / 1e6
            print(f"{label:<8} {title:<14} {enc:>16,.0f} {enc * mb:>12,.0f} {dec:>16,.0f} {dec * mb:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
