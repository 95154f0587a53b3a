"""The quickstart: a tiny local model learns a synthetic task end to end.

``scripts/quickstart.sh`` runs ``python -m posttrain.quickstart``. Stages:
  1. build a tiny Llama-style model and tokenizer (no hub needed);
  2. write the synthetic arithmetic task (train / held-out test);
  3. SFT with ``recipes/sft.yaml`` on DeepSpeed;
  4. load the saved checkpoint with plain transformers, generate on held-out
     prompts, and report format adherence and accuracy.
Everything lands in ``runs/quickstart/``; ``summary.json`` holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from posttrain.distributed import configure_environment

REPO = Path(__file__).resolve().parents[1]


def greedy_completions(model_dir: str | Path, prompts: list, *, max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy generations with plain transformers (what a user without posttrain would do)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list)
             else p for p in prompts]
    outputs = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            new = generated[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def score_arithmetic(completions: list[str], answers: list[str]) -> dict:
    """Share of completions in the training format, and share with the right boxed answer."""
    import re

    from posttrain.data.synthetic import ANSWER_FORMAT

    boxed = re.compile(r"\\boxed\{(-?\d+)\}")
    fmt = sum(bool(ANSWER_FORMAT.match(c.strip())) for c in completions)
    correct = 0
    for completion, answer in zip(completions, answers):
        found = boxed.findall(completion)
        correct += bool(found) and found[-1] == answer
    n = max(len(completions), 1)
    return {"format": fmt / n, "accuracy": correct / n}


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    parser = argparse.ArgumentParser(prog="python -m posttrain.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts to generate for")
    args = parser.parse_args(argv)

    from posttrain.cli.main import print_user_error
    from posttrain.data.loading import load_rows
    from posttrain.data.synthetic import write_task
    from posttrain.errors import UserError
    from posttrain.models.tiny import make_tiny_model
    from posttrain.run import run_recipe

    out = Path(args.output_dir)
    started = time.perf_counter()
    try:
        model_dir = out / "model-init"
        if not (model_dir / "config.json").is_file():
            print(f"[quickstart] building a tiny model in {model_dir}")
            make_tiny_model(model_dir, seed=args.seed)
        data = write_task("arithmetic", out / "data", train=2000, test=200, seed=args.seed)
        print("[quickstart] supervised fine-tuning (recipes/sft.yaml)")
        sft = run_recipe(str(REPO / "recipes" / "sft.yaml"), [
            f"output_dir={out / 'sft'}", f"model.path={model_dir}", f"data.path={data['train']}",
            f"seed={args.seed}", "overwrite=true",
        ])
        test = [r.data for r in load_rows(str(data["test"]))][: args.eval_prompts]
        checkpoint = Path(sft["checkpoint"]) / "model"
        scores = score_arithmetic(greedy_completions(checkpoint, [r["prompt"] for r in test]),
                                  [r["answer"] for r in test])
        init_scores = score_arithmetic(greedy_completions(model_dir, [r["prompt"] for r in test]),
                                       [r["answer"] for r in test])
    except UserError as err:
        print_user_error(err)
        return err.exit_code
    summary = {
        "eval_loss_before": sft["eval_loss_start"], "eval_loss_after": sft["eval_loss_end"],
        "format_before": init_scores["format"], "format_after": scores["format"],
        "accuracy_before": init_scores["accuracy"], "accuracy_after": scores["accuracy"],
        "checkpoint": str(checkpoint), "plots": str(out / "sft" / "plots"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n[quickstart] held-out results (greedy, plain transformers)")
    print(f"  {'':22}{'before':>10}{'after':>10}")
    print(f"  {'eval loss':22}{summary['eval_loss_before']:>10.3f}{summary['eval_loss_after']:>10.3f}")
    print(f"  {'answer in format':22}{summary['format_before']:>10.0%}{summary['format_after']:>10.0%}")
    print(f"  {'accuracy':22}{summary['accuracy_before']:>10.0%}{summary['accuracy_after']:>10.0%}")
    print(f"[quickstart] checkpoint (Hugging Face format): {checkpoint}")
    print(f"[quickstart] plots: {summary['plots']}   summary: {out / 'summary.json'}")
    print(f"[quickstart] done in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
