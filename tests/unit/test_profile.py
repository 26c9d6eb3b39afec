"""kvstack.dev.profile's reading of py-spy's raw (folded) output."""

from __future__ import annotations

from kvstack.dev import profile

ROOT = 'process 7:"python -m kvstack backend";main (/w/src/kvstack/runtime.py:500)'
FOLDED = "\n".join(
    [
        f"{ROOT};format (/w/src/kvstack/runtime.py:190);"
        "JsonFormatter.format (/w/src/kvstack/runtime.py:191) 3",
        f"{ROOT};emit (logging/__init__.py:1110) 2",
        'process 7:"python";Thread.run (threading.py:975);'
        "Store.apply (/w/src/kvstack/backend/store.py:160) 5",
        "not a stack line",
    ]
)


def test_samples_become_ms_per_request_with_logging_apart() -> None:
    """Each sample is 1/RATE s; spread over the requests, per function by its own samples,
    line numbers dropped and paths shortened; stacks through logging counted apart."""
    sampled, logging_ms, rows = profile.top(FOLDED, requests=10, count=2)
    per = 1000 / profile.RATE / 10
    assert sampled == 10 * per
    assert logging_ms == 5 * per  # JsonFormatter.format and logging's emit; not main's own
    assert rows == [
        ("Store.apply (kvstack/backend/store.py)", 5 * per, 5 * per),
        ("JsonFormatter.format (kvstack/runtime.py)", 3 * per, 3 * per),
    ]
