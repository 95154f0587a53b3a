"""Draw docs/img/layout.png: the training layout (ZeRO-3 partitions) against the inference layout (TP engines).

The engine grouping comes from ``posttrain.rollout.layout.Layout``, the class the runs use, so the picture
shows what the code does. Three panels: one 8-GPU node colocated (ZeRO-3 over 8, four TP=2 engines), the
2-process CPU case the tests run (one TP=2 engine over both ranks), and a disaggregated run (2 learners,
2 rollout ranks forming one TP=2 engine).

    python scripts/draw_layout.py [--out docs/img/layout.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from posttrain.rollout.layout import Layout  # noqa: E402

ENGINE_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
LEARNER_COLOUR = "#B0B0B0"


def draw_panel(axis, title: str, world: int, learners: int, layout: Layout, device: str) -> None:
    """One row of ``world`` devices: the learner's ZeRO-3 partitions on top, the engine shards below."""
    from matplotlib.patches import FancyArrowPatch, Rectangle

    first_engine_rank = world - layout.engine_ranks
    for rank in range(world):
        x = rank * 1.1
        axis.add_patch(Rectangle((x, 0), 1.0, 3.0, fill=False, linewidth=1.2))
        axis.text(x + 0.5, 3.15, f"{device} {rank}", ha="center", va="bottom", fontsize=8)
        if rank < learners:
            axis.add_patch(Rectangle((x + 0.08, 1.85), 0.84, 0.95, color=LEARNER_COLOUR))
            axis.text(x + 0.5, 2.32, f"ZeRO-3\n1/{learners} of\nparams+optim", ha="center", va="center",
                      fontsize=6.5)
        if rank >= first_engine_rank:
            engine_rank = rank - first_engine_rank
            engine = layout.engine_of(engine_rank)
            shard = layout.members(engine).index(engine_rank)
            colour = ENGINE_COLOURS[engine % len(ENGINE_COLOURS)]
            axis.add_patch(Rectangle((x + 0.08, 0.15), 0.84, 0.95, color=colour, alpha=0.85))
            axis.text(x + 0.5, 0.62, f"engine {engine}\nshard {shard + 1}/{layout.tensor_parallel_size}",
                      ha="center", va="center", fontsize=6.5, color="white")
    for engine in range(layout.engines):
        ranks = [first_engine_rank + r for r in layout.members(engine)]
        left, right = ranks[0] * 1.1, ranks[-1] * 1.1 + 1.0
        axis.plot([left + 0.05, right - 0.05], [-0.15, -0.15], color=ENGINE_COLOURS[engine % len(ENGINE_COLOURS)],
                  linewidth=3)
    # One bucket: gathered from the partitions, then each shard keeps its slice.
    start = (learners * 1.1 - 0.1) / 2
    for rank in range(first_engine_rank, world):
        arrow = FancyArrowPatch((start, 1.8), (rank * 1.1 + 0.5, 1.12), arrowstyle="-|>", mutation_scale=7,
                                color="black", alpha=0.35, linewidth=0.8)
        axis.add_patch(arrow)
    axis.set_xlim(-0.2, world * 1.1)
    axis.set_ylim(-0.5, 3.6)
    axis.set_title(title, fontsize=9, loc="left")
    axis.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "img" / "layout.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 6.2))
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1), width_ratios=(1, 1.2))
    node = fig.add_subplot(grid[0, :])
    draw_panel(node, "one 8-GPU node, colocated: learner.zero_stage=3 over 8, rollout.tensor_parallel_size=2 "
               "-> 4 data-parallel engines of 2 shards", world=8, learners=8, layout=Layout(8, 2), device="GPU")
    draw_panel(fig.add_subplot(grid[1, 0]), "2 CPU processes (the tests): one TP=2 engine over both",
               world=2, learners=2, layout=Layout(2, 2), device="rank")
    draw_panel(fig.add_subplot(grid[1, 1]), "disaggregated: 2 learners, rollout.ranks=2 form one TP=2 engine",
               world=4, learners=2, layout=Layout(2, 2), device="rank")
    fig.text(0.5, 0.01, "grey: the learner's ZeRO-3 partition on each rank; coloured: engine shards (a bar under "
             "the ranks of one engine).\nA weight sync gathers one bucket of full parameters at a time (arrows); "
             "every shard loads only its slice of it.", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
