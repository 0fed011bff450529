# ruff: noqa: E501  (one workload template per line reads best)
"""Classifier cost per statement, cold and warm, on a realistic mix.

Run:  python bench/classify_bench.py [--statements N] [--rounds R]

The mix: pgbench's TPC-B-like transaction (reads, updates, insert, BEGIN/END), ORM-style
queries (quoted identifiers, joins, IN lists, bind parameters), and a few privileged statements.
Every generated statement carries fresh literal values, as a real workload does.

- cold:        a fresh engine with caching disabled: decode + parse + walk + rules, every time.
- warm:        caches filled by one pass, then a second pass with *different literals*: answered
               by the shape cache (constants replaced via libpg_query's normalize).
- warm-repeat: a quarter of the first pass's texts, four times over: identical text repeats (as
               bind-parameter workloads do). Texts first answered from the shape cache stay there,
               texts classified in full are answered from the exact cache (<1 µs).

Prints microseconds per statement (median of rounds). No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from pgguard.policy import Context, PolicyEngine

Template = Callable[[random.Random], str]

TEMPLATES: list[tuple[str, Template]] = [
    (
        "pgbench select",
        lambda r: f"SELECT abalance FROM pgbench_accounts WHERE aid = {r.randint(1, 10**7)};",
    ),
    (
        "pgbench update accounts",
        lambda r: (
            f"UPDATE pgbench_accounts SET abalance = abalance + {r.randint(-5000, 5000)} WHERE aid = {r.randint(1, 10**7)};"
        ),
    ),
    (
        "pgbench update tellers",
        lambda r: (
            f"UPDATE pgbench_tellers SET tbalance = tbalance + {r.randint(-5000, 5000)} WHERE tid = {r.randint(1, 1000)};"
        ),
    ),
    (
        "pgbench update branches",
        lambda r: (
            f"UPDATE pgbench_branches SET bbalance = bbalance + {r.randint(-5000, 5000)} WHERE bid = {r.randint(1, 100)};"
        ),
    ),
    (
        "pgbench insert",
        lambda r: (
            f"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({r.randint(1, 1000)}, {r.randint(1, 100)}, {r.randint(1, 10**7)}, {r.randint(-5000, 5000)}, CURRENT_TIMESTAMP);"
        ),
    ),
    ("begin", lambda r: "BEGIN;"),
    ("end", lambda r: "END;"),
    (
        "orm get by pk",
        lambda r: (
            f'SELECT "shop_order"."id", "shop_order"."customer_id", "shop_order"."total", "shop_order"."created" FROM "shop_order" WHERE "shop_order"."id" = {r.randint(1, 10**6)} LIMIT 21'
        ),
    ),
    (
        "orm join filter",
        lambda r: (
            f"SELECT o.id, o.total, c.email FROM shop_order o INNER JOIN shop_customer c ON c.id = o.customer_id WHERE c.country = '{r.choice(['DE', 'FR', 'US'])}' AND o.created >= '2024-0{r.randint(1, 9)}-01' ORDER BY o.created DESC LIMIT 50 OFFSET {r.randint(0, 500)}"
        ),
    ),
    (
        "orm in list",
        lambda r: (
            "SELECT id, sku, price FROM shop_product WHERE id IN ("
            + ", ".join(str(r.randint(1, 10**5)) for _ in range(r.randint(3, 30)))
            + ")"
        ),
    ),
    (
        "orm insert returning",
        lambda r: (
            f"INSERT INTO shop_event (kind, payload, created) VALUES ('click', '{{\"x\": {r.randint(1, 999)}}}', now()) RETURNING id"
        ),
    ),
    (
        "orm bind params",
        lambda r: (
            'SELECT "auth_user"."id", "auth_user"."email" FROM "auth_user" WHERE "auth_user"."email" = $1 AND "auth_user"."is_active" = $2'
        ),
    ),
    (
        "orm aggregate",
        lambda r: (
            f"SELECT date_trunc('day', created) AS d, count(*), sum(total) FROM shop_order WHERE customer_id = {r.randint(1, 10**5)} GROUP BY 1 ORDER BY 1"
        ),
    ),
    (
        "cte report",
        lambda r: (
            f"WITH recent AS (SELECT * FROM shop_order WHERE created > now() - interval '{r.randint(1, 30)} days') SELECT customer_id, sum(total) FROM recent GROUP BY customer_id HAVING sum(total) > {r.randint(100, 1000)}"
        ),
    ),
    ("set", lambda r: f"SET statement_timeout = '{r.randint(1, 60)}s'"),
    (
        "privileged copy",
        lambda r: f"COPY (SELECT * FROM shop_customer WHERE id > {r.randint(1, 100)}) TO STDOUT",
    ),
    ("privileged ddl", lambda r: f"CREATE TEMP TABLE scratch_{r.randint(1, 10)} (id int)"),
    ("privileged set_config", lambda r: f"SELECT set_config('role', 'r{r.randint(1, 9)}', false)"),
    ("privileged admin", lambda r: f"SELECT pg_terminate_backend({r.randint(100, 9999)})"),
]
WEIGHTS = [20, 20, 20, 20, 20, 20, 20, 10, 8, 6, 6, 10, 4, 3, 2, 1, 1, 1, 1]


def workload(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    picks = rng.choices(range(len(TEMPLATES)), weights=WEIGHTS, k=n)
    return [TEMPLATES[i][1](rng).encode() for i in picks]


def per_statement_us(engine: PolicyEngine, statements: list[bytes], ctx: Context) -> float:
    classify = engine.classify
    start = time.perf_counter_ns()
    for sql in statements:
        classify(sql, ctx)
    return (time.perf_counter_ns() - start) / len(statements) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ctx = Context(agent="bench", database="bench")
    cold, warm, exact = [], [], []
    for round_no in range(args.rounds):
        first = workload(args.statements, seed=2 * round_no)
        second = workload(args.statements, seed=2 * round_no + 1)  # same shapes, new literals
        cold.append(per_statement_us(PolicyEngine.load(cache_size=0), first, ctx))
        engine = PolicyEngine.load()
        per_statement_us(engine, first, ctx)
        warm.append(per_statement_us(engine, second, ctx))
        exact.append(per_statement_us(engine, first[: len(first) // 4] * 4, ctx))
    print(f"statements per round: {args.statements}, rounds: {args.rounds} (median shown)")
    print(f"{'path':<12} {'µs/statement':>13} {'min':>8} {'max':>8}")
    for name, values in (("cold", cold), ("warm", warm), ("warm-repeat", exact)):
        print(
            f"{name:<12} {statistics.median(values):>13.2f} {min(values):>8.2f} {max(values):>8.2f}"
        )
    print()
    print("per statement type, cold vs warm (µs):")
    engine = PolicyEngine.load()
    cold_engine = PolicyEngine.load(cache_size=0)
    rng = random.Random(99)
    for name, template in TEMPLATES:
        samples = [template(rng).encode() for _ in range(400)]
        cold_us = per_statement_us(cold_engine, samples[:200], ctx)
        per_statement_us(engine, samples[:200], ctx)
        warm_us = per_statement_us(engine, samples[200:], ctx)
        print(f"  {name:<26} cold {cold_us:>8.1f}   warm {warm_us:>6.1f}")


if __name__ == "__main__":
    main()
