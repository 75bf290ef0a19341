"""Ring balance, scale-out movement and routing cost (docs/design.md §5).

Run from a checkout with the package installed (`pip install -e .`)::

    python bench/bench_ring.py [--names 20000] [--repeat 7]

Prints:
  1. slots per broker for 10 brokers at 40, 160 and 640 vnodes;
  2. the share of slots retargeted going from n to n+1 brokers (n = 1..9),
     against the ideal 1/(n+1), and whether all went to the new broker;
  3. ns per `Topology.route(queue)` and per `slot_of(queue)` over many
     distinct queue names, each with its ratio to a plain `dict.get` timed
     in the same run (the machine is noisy; the ratio travels better).
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections import Counter
from collections.abc import Callable

from shardq.router import NUM_SLOTS, BrokerInfo, Ring, Topology, ring_for, slot_of
from shardq.router import slots as _slots

BROKERS = 10
VNODES = (40, 160, 640)
ROUTE_BUDGET_NS = 500  # docs/design.md §5: routing a queue costs <= 0.5 us


def _ids(n: int) -> dict[str, int]:
    return {f"b{i}": 1 for i in range(1, n + 1)}


def balance_table() -> None:
    print(f"1. Ring balance: {BROKERS} brokers, {NUM_SLOTS} slots (avg {NUM_SLOTS / BROKERS:.1f})")
    header = ("vnodes", "min", "avg", "max", "max/avg", "min/avg", "stddev")
    print("   " + " ".join(f"{h:>{w}}" for h, w in zip(header, (6, 5, 7, 5, 8, 8, 7), strict=True)))
    for vnodes in VNODES:
        counts = Counter(Ring(_ids(BROKERS), vnodes).targets())
        values = [counts[b] for b in _ids(BROKERS)]
        avg = NUM_SLOTS / BROKERS
        print(
            f"   {vnodes:>6} {min(values):>5} {avg:>7.1f} {max(values):>5} "
            f"{max(values) / avg:>8.3f} {min(values) / avg:>8.3f} {statistics.pstdev(values):>7.1f}"
        )
    print()


def movement_table() -> None:
    print("2. Scale out n -> n+1 brokers (160 vnodes): share of slots retargeted")
    print(f"   {'n':>3} {'moved':>6} {'share':>7} {'ideal':>7} {'ratio':>6}  all onto new?")
    for n in range(1, 10):
        before = Ring(_ids(n)).targets()
        after = Ring(_ids(n + 1)).targets()
        moved = [s for s in range(NUM_SLOTS) if before[s] != after[s]]
        share, ideal = len(moved) / NUM_SLOTS, 1 / (n + 1)
        onto_new = all(after[s] == f"b{n + 1}" for s in moved)
        ratio = share / ideal
        print(f"   {n:>3} {len(moved):>6} {share:>7.4f} {ideal:>7.4f} {ratio:>6.3f}  {onto_new}")
    print()


def _per_call_ns(fn: Callable[[str], object], names: list[str], repeat: int,
                 setup: Callable[[], None] | None = None) -> float:
    def run() -> None:
        for q in names:
            fn(q)

    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        best = min(best, timeit.timeit(run, number=1))
    return best / len(names) * 1e9


def routing_table(n_names: int, repeat: int) -> None:
    names = [f"tenant-{i}:{stage}" for i in range(n_names // 4)
             for stage in ("enrich", "ai", "send", "webhook")]
    topo = Topology.empty()
    for b in _ids(BROKERS):
        topo.brokers[b] = BrokerInfo(b, f"10.0.0.{b[1:]}:7101")
    topo = topo.with_assignment(ring_for(topo).targets(), epoch=1)
    with_overrides = topo.copy()
    for i in range(3):
        with_overrides.patch_override(f"hot-{i}", "b1", "10.0.0.1:7101", epoch=2)
    baseline = {q: ("b1", "10.0.0.1:7101") for q in names}
    for q in names:  # warm the slot cache, as a running client would be
        slot_of(q)

    rows = [
        ("dict.get (baseline)", _per_call_ns(baseline.get, names, repeat)),
        ("slot_of (warm cache)", _per_call_ns(slot_of, names, repeat)),
        ("slot_of (cold: miss + hash)", _per_call_ns(slot_of, names, repeat,
                                                     setup=_slots._slot_cache.clear)),
        ("Topology.route", _per_call_ns(topo.route, names, repeat)),
        ("Topology.route (3 overrides)", _per_call_ns(with_overrides.route, names, repeat)),
        ("Topology.route (cold cache)", _per_call_ns(topo.route, names, repeat,
                                                     setup=_slots._slot_cache.clear)),
    ]
    base = rows[0][1]
    print(f"3. Routing cost over {len(names)} distinct queue names "
          f"(best of {repeat}, loop overhead included)")
    print(f"   {'operation':<30} {'ns/call':>8} {'x dict.get':>10}  within 500 ns?")
    for label, ns in rows:
        verdict = "" if label.startswith("dict") else str(ns <= ROUTE_BUDGET_NS)
        print(f"   {label:<30} {ns:>8.1f} {ns / base:>10.2f}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=20_000, help="distinct queue names")
    parser.add_argument("--repeat", type=int, default=7, help="timing repeats (best is kept)")
    args = parser.parse_args()
    balance_table()
    movement_table()
    routing_table(args.names, args.repeat)


if __name__ == "__main__":
    main()
