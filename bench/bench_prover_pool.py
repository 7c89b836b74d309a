"""Verification throughput: persistent REPL pool vs one fresh REPL process per proof.

Uses the fake REPL from tests/prover (a real subprocess speaking the REPL protocol) with a slow
"import Mathlib" header and fast proof bodies, so the measured ratio is the header amortisation the
pool buys; it does not measure Lean. Both modes go through the same ReplPool code path: the fresh
mode recycles each process after one proof (max_uses=1), which is the DeepSeek-Prover-V1.5 setup.

    python bench/bench_prover_pool.py                      # 1 s header, 50 ms bodies, 2 workers
    python bench/bench_prover_pool.py --proofs 20 100 --header-delay 1.0 --body-delay 0.05 --workers 2
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prover.dataset import DEFAULT_HEADER  # noqa: E402
from prover.pool import PoolConfig, ReplPool  # noqa: E402
from prover.repl_process import ProcessConfig  # noqa: E402
from prover.verdict import Status  # noqa: E402

FAKE = REPO / "tests" / "prover" / "fake_repl.py"


def proof(i: int) -> str:
    return DEFAULT_HEADER + f"theorem t{i} (x : ℝ) (h : 2 * x = 4) : x = 2 := by\n  linarith\n"


def run(n: int, workers: int, max_uses: int | None, header: float, body: float) -> float:
    cmd = (sys.executable, str(FAKE), "--header-delay", str(header), "--body-delay", str(body))
    pool = ReplPool(PoolConfig(ProcessConfig(cmd), workers=workers, max_uses=max_uses))
    label = "pool" if max_uses is None else "fresh"
    start = time.perf_counter()
    with pool, ThreadPoolExecutor(workers) as ex:
        verdicts = list(tqdm(ex.map(lambda i: pool.verify(proof(i), 60, theorem=f"t{i}"), range(n)),
                             total=n, desc=f"{label} n={n}", file=sys.stderr, leave=False))
    elapsed = time.perf_counter() - start
    bad = [v for v in verdicts if v.status is not Status.COMPLETE]
    if bad:
        raise SystemExit(f"{label}: {len(bad)} proofs not complete: {bad[0].reason}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proofs", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--header-delay", type=float, default=1.0)
    ap.add_argument("--body-delay", type=float, default=0.05)
    args = ap.parse_args()
    print(f"fake REPL: header {args.header_delay:g} s, body {args.body_delay * 1000:g} ms, "
          f"{args.workers} workers (every proof also runs its #print axioms audit, which the fake answers "
          "without delay)\n")
    print("| proofs | fresh process per proof (s) | pool (s) | fresh proofs/s | pool proofs/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.proofs:
        fresh = run(n, args.workers, 1, args.header_delay, args.body_delay)
        pooled = run(n, args.workers, None, args.header_delay, args.body_delay)
        print(f"| {n} | {fresh:.2f} | {pooled:.2f} | {n / fresh:.2f} | {n / pooled:.2f} | {fresh / pooled:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
