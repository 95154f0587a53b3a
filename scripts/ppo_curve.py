"""Reward curve and before/after table of a PPO run, for docs/rl.md.

    posttrain run recipes/ppo.yaml                  # writes runs/ppo/metrics.jsonl
    python scripts/ppo_curve.py                     # -> docs/img/ppo_reward.png and a markdown table

The plot shows the training reward (sampled completions of the step's prompts, with a moving average)
and the held-out greedy accuracy of every evaluation, against the rollout step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def table(records: list[dict], window: int) -> str:
    """Markdown rows: first and last `window` steps' mean training reward / accuracy, first and last eval."""
    steps = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]

    def mean(rows: list[dict], key: str) -> float:
        values = [r[key] for r in rows if key in r]
        return sum(values) / max(len(values), 1)

    first, last = steps[:window], steps[-window:]
    rows = [
        ("training reward (sampled, T=1), mean of steps "
         f"{first[0]['step']}-{first[-1]['step']} -> {last[0]['step']}-{last[-1]['step']}",
         mean(first, "reward/mean"), mean(last, "reward/mean")),
        ("held-out accuracy (greedy, step "
         f"{evals[0]['step']} -> {evals[-1]['step']})", evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]),
        ("KL to the reference per sequence (nats)", mean(first, "kl"), mean(last, "kl")),
        ("critic explained variance", mean(first, "explained_variance"), mean(last, "explained_variance")),
    ]
    lines = ["| metric | before | after |", "| --- | --- | --- |"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} |" for name, a, b in rows]
    return "\n".join(lines)


def plot(records: list[dict], out: Path, window: int, title: str, baseline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    x = [r["step"] for r in steps]
    reward = [r["reward/mean"] for r in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, reward, color="tab:blue", alpha=0.3, label="training reward (per step)")
    ax.plot(x, moving_average(reward, window), color="tab:blue", label=f"training reward ({window}-step mean)")
    ax.plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-", color="tab:orange",
            label="held-out accuracy (greedy)")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="starting model, sampled, training prompts")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("math_verify reward / accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/ppo", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "ppo_reward.png"))
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the smoothed curve and the table")
    parser.add_argument("--title", default="PPO on the arithmetic task (tiny model, CPU)")
    parser.add_argument("--baseline", type=float, default=None,
                        help="the starting model's expected training reward, drawn as a line (e.g. from "
                             "`posttrain eval MODEL train.jsonl -n 4 --temperature 1`)")
    args = parser.parse_args(argv)
    metrics = Path(args.run) / "metrics.jsonl"
    if not metrics.is_file():
        print(f"no {metrics}: run `posttrain run recipes/ppo.yaml` first", file=sys.stderr)
        return 2
    records = read(metrics)
    plot(records, Path(args.out), args.window, args.title, args.baseline)
    print(f"wrote {args.out}\n")
    print(table(records, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
