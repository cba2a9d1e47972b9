"""Summarise a py-spy ``--format raw`` profile of one benchmark measurement.

Record one child measurement (its inputs written first, see README.md), then
summarise where its CPU samples went::

    A="--child --run prof1 --broker redis --mode sync --count 20000"
    .venv/bin/python benchmarks/processor.py $A --prefill
    .venv/bin/py-spy record -r 500 --gil -f raw -o /tmp/redis-sync.txt -- \\
        .venv/bin/python benchmarks/processor.py $A
    .venv/bin/python benchmarks/spy_report.py /tmp/redis-sync.txt

Samples of the untimed parts (imports, prefill, observation, cleanup) are left
out, so the shares are of the timed window. Functions are named ``file:function``
with the file shortened to its package path.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable

#: Frames of untimed work: a sample whose stack holds one is not counted.
UNTIMED = (
    "_find_and_load",
    "prefill (brokers.py",
    "cleanup (brokers.py",
    "open_observer (brokers.py",
    "last_output (brokers.py",
    "outputs (brokers.py",
    "settled (brokers.py",
    "collect_garbage (processor.py",
)

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>.+?)(?::\d+)?\)$")
_PACKAGE_ROOTS = ("site-packages/", "lib/python3.11/", "/work/main/")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    for root in _PACKAGE_ROOTS:
        if root in path:
            path = path.split(root, 1)[1]
    return f"{path}:{match['func']}"


def module_of(name: str) -> str:
    """The file part of ``file:function``."""
    return name.rsplit(":", 1)[0]


def read(path: str) -> list[tuple[list[str], int]]:
    samples = []
    with open(path) as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or any(marker in stack for marker in UNTIMED):
                continue
            samples.append(([frame_name(f) for f in stack.split(";")], int(count)))
    return samples


def top(counter: collections.Counter[str], total: int, limit: int) -> Iterable[str]:
    for name, count in counter.most_common(limit):
        yield f"{100 * count / total:6.1f}%  {name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="py-spy --format raw output")
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument(
        "--under",
        action="append",
        default=[],
        help="also show what is spent inside this function (file:function)",
    )
    args = parser.parse_args()
    samples = read(args.profile)
    total = sum(count for _, count in samples) or 1
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        own[frames[-1]] += count
        by_file[module_of(frames[-1])] += count
        for name in set(frames):
            inclusive[name] += count
    print(f"{total} samples in the timed window\n")
    print("self time by file:")
    print("\n".join(top(by_file, total, args.limit)))
    print("\nself time by function:")
    print("\n".join(top(own, total, args.limit)))
    print("\ninclusive time by function:")
    print("\n".join(top(inclusive, total, args.limit)))
    for name in args.under:
        inside: collections.Counter[str] = collections.Counter()
        for frames, count in samples:
            if name in frames:
                below = frames[frames.index(name) + 1 :]
                inside[below[0] if below else "(self)"] += count
        print(f"\ndirectly under {name}:")
        print("\n".join(top(inside, total, args.limit)))


if __name__ == "__main__":
    main()
