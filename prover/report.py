"""Run summary files: summary.json, a Markdown table, and the pass@k plot."""
from __future__ import annotations

import json
from pathlib import Path


def markdown_table(summary: dict) -> str:
    ks = summary["ks"]
    head = ["category", "problems", "solved"] + [f"first@{k}" for k in ks] + [f"unbiased@{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, row in summary["table"].items():
        cells = [group, str(row["problems"]), str(row["solved"])]
        cells += [f"{100 * row[f'first@{k}']:.1f}%" for k in ks]
        cells += ["-" if row[f"unbiased@{k}"] is None else f"{100 * row[f'unbiased@{k}']:.1f}%" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pass_at_k(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = summary["ks"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, row in summary["table"].items():
        style = {"linewidth": 2.5, "color": "black"} if group == "all" else {"linewidth": 1, "alpha": 0.8}
        ax.plot(ks, [100 * row[f"first@{k}"] for k in ks], marker="o", label=group, **style)
    overall = summary["table"]["all"]
    if all(overall[f"unbiased@{k}"] is not None for k in ks):
        ax.plot(ks, [100 * overall[f"unbiased@{k}"] for k in ks], "k--", label="all (unbiased)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title("solved within the first k samples")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown_table(summary))
    plot_pass_at_k(summary, out / "passk.png")
