"""The benchmarks' figures."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: Path) -> None:
    """Write a benchmark's figure as a PNG (creating its folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(result: dict, path: Path) -> None:
    """Left: samples/s per setup; right: sync seconds and peak extra memory against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(result["setups"])
    left.barh(labels[::-1], [result["setups"][k]["samples_per_s"] for k in labels[::-1]], color="tab:blue")
    left.set_xlabel("GRPO samples/s (median)")
    left.set_title("step throughput")
    sync = result["sync"]
    if sync:
        params = [s["parameters"] for s in sync]
        right.plot(params, [s["seconds"] for s in sync], "o-", color="tab:red", label="sync seconds")
        right.set_xscale("log")
        right.set_xlabel("parameters")
        right.set_ylabel("seconds", color="tab:red")
        memory = right.twinx()
        memory.plot(params, [(s["measured_peak_bytes"] or 0) / 2**20 for s in sync], "s--", color="tab:green",
                    label="measured peak extra")
        memory.plot(params, [s["model_bytes"] / 2**20 for s in sync], ":", color="gray", label="model size")
        memory.set_ylabel("MiB", color="tab:green")
        memory.legend(loc="upper left", fontsize=8)
        right.set_title(f"weight sync ({result['settings']['bucket_mb']} MiB buckets)")
    save_figure(fig, path)


def plot_tp_sync(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [s["parameters"] / 1e6 for s in result["sizes"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for tp, marker in ((1, "o"), (2, "s")):
        left.plot(params, [s[f"tp{tp}"]["seconds"] for s in result["sizes"]], marker=marker, label=f"TP={tp}")
        right.plot(params, [s[f"tp{tp}"]["peak_bytes_per_rank"] / 2**20 for s in result["sizes"]], marker=marker,
                   label=f"TP={tp}")
    for axis, label in ((left, "sync seconds (slowest rank)"), (right, "peak growth per rank (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("parameters (M)")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle(f"ZeRO-3 learner on 2 processes -> 2 replicas (TP=1) or one TP=2 engine; "
                 f"{result['bucket_mb']} MiB buckets")
    save_figure(fig, path)
