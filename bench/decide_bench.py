"""µs per `decide()` for a 3-route policy, sticky and non-sticky. Prints figures; asserts nothing.

    .venv/bin/python bench/decide_bench.py [--number 200000]

Each figure is the best of 5 runs of `--number` calls (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit

from meshlet.policy import load_text
from meshlet.routing import RequestView, compile_table, decide

POLICY = """
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
    v3: {address: "127.0.0.1:9083"}
  routes:
    - name: beta
      match: {headers: {x-group: beta}, cookies: {ab: B}}
      to: [{backend: v2}]
    - name: items
      match: {path: {regex: "/items/[0-9]+"}, method: [GET, HEAD]}
      to: [{backend: v3}]
    - name: canary
      to: [{backend: v1, weight: 70}, {backend: v2, weight: 20}, {backend: v3, weight: 10}]
      STICKY
"""


def _table(sticky: bool):
    text = POLICY.replace("STICKY", "sticky: {header: x-user-id}" if sticky else "")
    return compile_table(load_text(text, "bench.yaml").traffic)


def _request(authority: str = "reviews.default.svc.cluster.local:9080", path: str = "/reviews/1?page=2",
             **headers: str) -> RequestView:
    headers = {"user-agent": "bench/1.0", "accept": "*/*", "x-user-id": "user-4711", **headers}
    return RequestView("GET", authority, path, headers, {"ab": "A"}, "10.0.0.7", random.getrandbits(64))


CASES = [
    ("routes 1-2 miss, default split, non-sticky (entropy)", False, _request()),
    ("routes 1-2 miss, default split, sticky (header, 3 backends)", True, _request()),
    ("sticky route, key absent -> entropy", True, _request(**{"x-user-id": ""})),
    ("route 2 (path regex + method) matches, one backend", False, _request(path="/items/42?x=1")),
    ("host not governed -> None", False, _request(authority="ratings:9080")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=200_000, help="calls per run (default 200000)")
    args = parser.parse_args()
    print(f"decide() on {sys.implementation.name} {sys.version.split()[0]}, best of 5 x {args.number} calls")
    for label, sticky, request in CASES:
        table = _table(sticky)
        best = min(timeit.repeat(lambda t=table, r=request: decide(t, r), number=args.number, repeat=5))
        print(f"  {1e6 * best / args.number:6.2f} µs  {label}")


if __name__ == "__main__":
    main()
