"""pass@k two ways: "solved within the first k samples" (what DeepSeek/Goedel report) and the unbiased estimator."""
from __future__ import annotations

from collections import defaultdict


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): chance that k of the n samples, drawn without replacement, include a success."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def solved_within_first(successes: dict[int, bool], k: int) -> bool:
    """Any success among sample indices 0..k-1."""
    return any(ok for sample, ok in successes.items() if sample < k)


def summarize(outcomes: dict[str, dict[int, bool]], categories: dict[str, str], ks: list[int]) -> dict:
    """Per-category and overall table from {problem: {sample: complete?}} over every problem of the set."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in categories:
        groups[categories[name]].append(name)
        groups["all"].append(name)
    table = {}
    for group, names in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        row = {"problems": len(names),
               "solved": sum(any(outcomes.get(n, {}).values()) for n in names),
               "attempts": sum(len(outcomes.get(n, {})) for n in names)}
        for k in ks:
            row[f"first@{k}"] = sum(solved_within_first(outcomes.get(n, {}), k) for n in names) / len(names)
            estimable = [outcomes.get(n, {}) for n in names if len(outcomes.get(n, {})) >= k]
            row[f"unbiased@{k}"] = (sum(pass_at_k_unbiased(len(o), sum(o.values()), k) for o in estimable)
                                    / len(estimable)) if len(estimable) == len(names) else None
        table[group] = row
    return table
