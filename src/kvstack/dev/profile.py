"""`python -m kvstack.dev.profile`: where a request's time goes in the server and the backend.

Starts a backend and a server as `make bench` does (kvstack.dev.bench), drives one cell with the
bench's load generator (Put, 32 in flight by default), and samples both services with py-spy
over the measured window. It prints, per service, its CPU per request (from /proc, every
thread) and the functions with the most samples, as ms per request: self (the function itself
was running) and inclusive (it was on the stack). docs/profile.md is written from its output.

py-spy is not a dependency of the project: `pip install py-spy` (PyPI ships it as a binary
wheel; https://pypi.org/project/py-spy/). It is used as its README says: `py-spy record --pid
PID --duration S --format raw -o FILE` writes folded stacks ("frame;frame;... count" a line,
root first), sampled 100 times a second by default, idle threads left out; `--nonblocking`
samples without pausing the process, so the profile slows the services less.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from kvstack.dev import bench

RATE = 100  # samples per second (py-spy's default, said explicitly)
# A frame of logging's own, of json's, or of the services' JSON formatter: the cost of a log line.
LOGGING = re.compile(r"[(/](logging|json)/|^JsonFormatter\.")
_LINE = re.compile(r" \(([^()]*):\d+\)$")  # "function (path/file.py:123)" -> drop the line


def _frame(raw: str) -> str:
    """A folded frame as `function (file.py)`: the line number dropped, the path shortened."""
    match = _LINE.search(raw)
    if not match:
        return raw
    name = raw[: match.start()]
    path = match[1]
    short = path.split("/site-packages/")[-1].split("/src/")[-1]
    return f"{name} ({short})"


def top(
    folded: str, requests: int, count: int = 12
) -> tuple[float, float, list[tuple[str, float, float]]]:
    """(ms sampled per request, of them ms with logging on the stack, [(function, self ms,
    inclusive ms) per request] for the `count` functions with the most samples of their own)
    from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = logging = 0
    for line in folded.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        n = int(number)
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        logging += n if any(LOGGING.search(f) for f in frames) else 0
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    per = 1000 / RATE / max(1, requests)  # ms of one sample, per request
    rows = [(name, n * per, inclusive[name] * per) for name, n in own.most_common(count)]
    return total * per, logging * per, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvstack.dev.profile", description=__doc__)
    parser.add_argument("--op", choices=("put", "get"), default="put", help="the call driven")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds sampled")
    parser.add_argument("--level", default="INFO", help="the services' KVSTACK_LOG_LEVEL")
    parser.add_argument(
        "--services-path",
        default=None,
        help="a src/ directory whose kvstack the services run (e.g. an older commit's, from "
        "git archive), put first on their PYTHONPATH; the load generator runs this one",
    )
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--native", action="store_true", help="also sample C frames (grpc's Cython, LMDB)"
    )
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy, then run this again", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kvstack-profile-") as tmp:
        work = Path(tmp)
        # A Get cell first writes the keys it reads (about 2 s here): sampling starts after.
        seeding = 3.0 if args.op == "get" else 0.0
        run = bench.Run(duration=args.duration + 2 + seeding, warmup=1.0, data_dir=work)
        cell = bench.Cell(f"{args.op}-{args.concurrency}", "stack", args.op, args.concurrency)
        extra = {"PYTHONPATH": args.services_path} if args.services_path else {}
        with bench._stack(run, work, "profile", args.level, **extra) as (server, watch, _, _):
            results: list[bench.Result] = []
            load = threading.Thread(
                target=lambda: results.append(
                    bench._loadgen(
                        cell,
                        server.target,
                        run,
                        work / "loadgen.log",
                        watch,
                        seed=args.op == "get",
                    )
                )
            )
            load.start()
            time.sleep(run.warmup + 1 + seeding)
            spies = {
                name: subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(args.duration)),
                        "--rate",
                        str(RATE),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "-o",
                        str(work / f"{name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in watch.items()
            }
            for proc in spies.values():
                proc.wait()
            load.join()
        (result,) = results
        requests = int(result.qps * int(args.duration))
        print(
            f"{args.op.capitalize()} at {args.concurrency} in flight, services at {args.level}"
            + (f" from {args.services_path}" if args.services_path else "")
            + f": {result.qps:,.0f} req/s, p99 {result.p99_ms:.1f} ms; machine's other "
            f"processes {bench.other_cpu(result):.0f}% of a core"
        )
        for name in spies:
            cpu_ms = result.cpu_pct[name] * 10 / max(1.0, result.qps)
            sampled, logged, rows = top((work / f"{name}.txt").read_text(), requests, args.top)
            print(
                f"\n{name}: {cpu_ms:.3f} ms CPU per request (/proc, every thread); "
                f"{sampled:.3f} ms sampled (threads not idle), {logged:.3f} ms of it logging"
            )
            print(f"  {'self ms':>8} {'incl ms':>8}  function")
            for function, own, incl in rows:
                print(f"  {own:8.3f} {incl:8.3f}  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
