"""The offline recipes on the shipped examples, from the quickstart's SFT model, with before/after numbers.

    python scripts/offline_demo.py [--only dpo rm prm kto ipo simpo orpo rpo] [--output-dir runs/offline-demo]

Runs ``recipes/{dpo,rm,prm,kto}.yaml`` as shipped (each in its own ``posttrain run``), then prints:
  - DPO: held-out reward accuracy, and greedy accuracy and answer format of the policy on the
    held-out prompts of examples/data/preference/test.jsonl, before (SFT model) and after;
  - RM: held-out pairwise accuracy before (fresh head) and after;
  - PRM: held-out per-step accuracy before and after, against the best constant predictor;
  - KTO: held-out reward margin (desirable - undesirable) and greedy accuracy on the prompts of
    examples/data/kto/test.jsonl;
  - with ``--only ... ipo simpo orpo rpo``: the DPO-family variants' reward accuracy and greedy accuracy.
The SFT model is built first with ``python -m posttrain.quickstart`` when it is missing.
Results also go to ``<output-dir>/summary.json``; docs/preference-data.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "runs" / "quickstart" / "sft" / "checkpoints" / "last" / "model"
RECIPES = ("dpo", "rm", "prm", "kto")
VARIANTS = ("ipo", "simpo", "orpo", "rpo")


def run(recipe: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "posttrain.cli.main", "run", str(REPO / "recipes" / f"{recipe}.yaml"),
               f"output_dir={out / recipe}", "overwrite=true", "logging.progress=false"]
    print(f"[demo] {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[demo] {recipe} failed:\n{done.stderr[-4000:]}")
    summary = json.loads((out / recipe / "summary.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def greedy(model_dir: Path, test_file: Path) -> dict:
    from posttrain.quickstart import greedy_completions, score_arithmetic

    rows = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]
    return score_arithmetic(greedy_completions(model_dir, [r["prompt"] for r in rows]), [r["answer"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/offline_demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=RECIPES + VARIANTS, default=list(RECIPES))
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "offline-demo"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.output_dir)
    if not (SFT / "config.json").is_file():
        print("[demo] no SFT model yet: running the quickstart", flush=True)
        subprocess.run([sys.executable, "-m", "posttrain.quickstart"], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    results: dict[str, dict] = {}
    rows = []  # (recipe, metric, before, after, bar)
    test = REPO / "examples" / "data" / "preference" / "test.jsonl"
    for recipe in [r for r in ("dpo", *VARIANTS) if r in args.only]:
        summary = run(recipe, out)
        before, after = greedy(SFT, test), greedy(Path(summary["checkpoint"]) / "model", test)
        results[recipe] = {"summary": summary, "greedy_before": before, "greedy_after": after}
        rows += [(recipe, "eval reward accuracy", summary["eval_start"]["rewards/accuracy"],
                  summary["eval_end"]["rewards/accuracy"], "> 0.9" if recipe == "dpo" else ""),
                 (recipe, "greedy accuracy (held-out prompts)", before["accuracy"], after["accuracy"],
                  "higher" if recipe == "dpo" else ""),
                 (recipe, "answer in format", before["format"], after["format"], "")]
    if "rm" in args.only:
        summary = run("rm", out)
        results["rm"] = {"summary": summary}
        rows.append(("rm", "eval pairwise accuracy", summary["eval_start"]["accuracy"],
                     summary["eval_end"]["accuracy"], "> 0.9"))
    if "prm" in args.only:
        summary = run("prm", out)
        results["prm"] = {"summary": summary}
        end = summary["eval_end"]
        rows.append(("prm", "eval step accuracy", summary["eval_start"]["step_accuracy"], end["step_accuracy"],
                     f"> {end['constant_baseline']:.3f} (constant)"))
    if "kto" in args.only:
        summary = run("kto", out)
        test = REPO / "examples" / "data" / "kto" / "test.jsonl"
        before, after = greedy(SFT, test), greedy(Path(summary["checkpoint"]) / "model", test)
        results["kto"] = {"summary": summary, "greedy_before": before, "greedy_after": after}
        rows += [("kto", "eval reward margin (desirable - undesirable)", summary["eval_start"]["rewards/margin"],
                  summary["eval_end"]["rewards/margin"], "> 0"),
                 ("kto", "greedy accuracy (held-out prompts)", before["accuracy"], after["accuracy"], "higher")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"rows": rows, **results}, indent=2, default=str) + "\n")
    print(f"\n{'recipe':8}{'metric':48}{'before':>9}{'after':>9}   target")
    for recipe, metric, before, after, bar in rows:
        print(f"{recipe:8}{metric:48}{before:>9.3f}{after:>9.3f}   {bar}")
    seconds = {r: results[r]["summary"]["wall_seconds"] for r in results}
    print(f"\n[demo] wall seconds per recipe: {seconds}; summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
