"""The quickstart: a tiny local model learns a verifiable task with SFT, then with RL.

``scripts/quickstart.sh`` runs ``python -m posttrain.quickstart``. Stages:
  1. build a tiny Llama-style model and tokenizer (no hub needed);
  2. write the synthetic ``largest`` task ("What is the largest of 24, 48, 26 and 2?") in three disjoint
     sets of questions: one for the SFT warm start, one for RL, and a held-out test set;
  3. a short SFT warm start with ``recipes/sft.yaml`` on DeepSpeed (one pass over its questions): it learns
     the answer format and a little of the skill;
  4. GRPO with ``recipes/grpo.yaml`` on the RL questions: vLLM samples 8 answers per prompt, the
     ``math_verify`` reward scores them, the DeepSpeed learner trains, the new weights are synced into vLLM,
     every step;
  5. load the SFT and the GRPO checkpoints with plain transformers, answer every held-out question
     greedily, and report accuracy before (SFT start) and after (GRPO).
RL prompts are not the SFT questions, so RL cannot just replay what SFT memorised: to raise its reward it
has to get better at the skill, which is what shows on the held-out questions.
Everything lands in ``runs/quickstart/``; ``summary.json`` holds the numbers (``accuracy_before``,
``accuracy_after``), ``plots/`` the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from posttrain.distributed import configure_environment

REPO = Path(__file__).resolve().parents[1]

# Curves copied into runs/quickstart/plots (the trainers write more in their own plots/ folders).
# The task and its three disjoint question sets (posttrain.data.synthetic).
TASK = "largest"
SFT_QUESTIONS = 1000  # two passes: the format and some of the skill
RL_QUESTIONS = 3000
TEST_QUESTIONS = 200
SFT_EPOCHS = 2

GRPO_PLOTS = ("reward-mean_eval-reward.png", "eval-accuracy.png", "kl.png", "time-samples_per_s.png")


def greedy_completions(model_dir: str | Path, prompts: list, *, max_new_tokens: int = 32, batch_size: int = 50) -> list[str]:
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


def score_answers(completions: list[str], answers: list[str], answer_format) -> dict:
    """Share of completions matching ``answer_format`` (the trained format), and share whose last
    ``\\boxed{}`` holds the answer."""
    import re

    boxed = re.compile(r"\\boxed\{(-?\d+)\}")
    fmt = sum(bool(answer_format.match(c.strip())) for c in completions)
    correct = 0
    for completion, answer in zip(completions, answers):
        found = boxed.findall(completion)
        correct += bool(found) and found[-1] == answer
    n = max(len(completions), 1)
    return {"format": fmt / n, "accuracy": correct / n}


def score_arithmetic(completions: list[str], answers: list[str]) -> dict:
    """``score_answers`` in the arithmetic task's format."""
    from posttrain.data.synthetic import ANSWER_FORMATS

    return score_answers(completions, answers, ANSWER_FORMATS["arithmetic"])


def held_out_scores(model_dir: Path, test: list[dict], task: str = TASK) -> dict:
    from posttrain.data.synthetic import ANSWER_FORMATS

    completions = greedy_completions(model_dir, [r["prompt"] for r in test])
    return score_answers(completions, [r["answer"] for r in test], ANSWER_FORMATS[task])


def write_quickstart_data(out_dir: Path, seed: int) -> dict[str, Path]:
    """``sft.jsonl``, ``rl.jsonl`` and ``test.jsonl``: three sets of questions, no question in two of them."""
    from posttrain.data.synthetic import question_key, write_task

    paths = write_task(TASK, out_dir, train=SFT_QUESTIONS + RL_QUESTIONS, test=TEST_QUESTIONS, seed=seed)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    sft = rows[:SFT_QUESTIONS]
    seen = {question_key(r) for r in sft}
    rl = [r for r in rows[SFT_QUESTIONS:] if question_key(r) not in seen]
    for name, part in (("sft", sft), ("rl", rl)):
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def run_stage(recipe: str, overrides: list[str], log_path: Path) -> dict:
    """Run one recipe in a fresh process (``python -m posttrain.run``), its log in ``log_path``; its summary.

    A fresh process per stage keeps each engine's process-wide state (DeepSpeed's process group,
    vLLM's thread settings) from leaking into the next stage.
    """
    from posttrain.errors import UserError

    output_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    command = [sys.executable, "-m", "posttrain.run", str(REPO / "recipes" / recipe), *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary_path = Path(output_dir) / "summary.json"
    if done.returncode != 0 or not summary_path.is_file():
        print("".join(log_path.read_text().splitlines(keepends=True)[-15:]), file=sys.stderr)
        raise UserError(f"the {recipe} stage failed (exit {done.returncode}); the end of its log is above, "
                        f"all of it in {log_path}.")
    return json.loads(summary_path.read_text())


def print_table(summary: dict) -> None:
    print("\n[quickstart] held-out accuracy (greedy, plain transformers, "
          f"{summary['held_out_prompts']} questions never trained on)")
    print(f"  {'':26}{'format':>10}{'accuracy':>10}")
    for label, key in (("tiny model (random init)", "init"), ("after SFT  (before RL)", "before"),
                       ("after GRPO (after RL)", "after")):
        print(f"  {label:26}{summary[f'format_{key}']:>10.0%}{summary[f'accuracy_{key}']:>10.0%}")
    gain = 100 * (summary["accuracy_after"] - summary["accuracy_before"])
    print(f"  RL gain: {gain:+.1f} points   training time: SFT {summary['sft_train_seconds']:.0f} s, "
          f"GRPO {summary['grpo_train_seconds']:.0f} s ({summary['grpo_steps']} steps)")


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    parser = argparse.ArgumentParser(prog="python -m posttrain.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data, SFT and GRPO")
    parser.add_argument("--grpo-steps", type=int, help="GRPO rollout steps (default: recipes/grpo.yaml's)")
    parser.add_argument("--skip-rl", action="store_true", help="stop after the SFT stage")
    args = parser.parse_args(argv)

    from posttrain.cli.main import print_user_error
    from posttrain.data.loading import load_rows
    from posttrain.errors import UserError
    from posttrain.models.tiny import make_tiny_model

    out = Path(args.output_dir).resolve()
    started = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        model_dir = out / "model-init"
        if not (model_dir / "config.json").is_file():
            print(f"[quickstart] building a tiny model in {model_dir}")
            make_tiny_model(model_dir, seed=args.seed)
        data = write_quickstart_data(out / "data", args.seed)
        test = [r.data for r in load_rows(str(data["test"]))]

        print(f"[quickstart] 1/2 supervised warm start on {SFT_QUESTIONS} questions (recipes/sft.yaml)")
        sft = run_stage("sft.yaml", [f"output_dir={out / 'sft'}", f"model.path={model_dir}",
                                     f"data.path={data['sft']}", f"seed={args.seed}", "overwrite=true",
                                     f"train.epochs={SFT_EPOCHS}", "logging.progress=false"], out / "sft.log")
        sft_model = Path(sft["checkpoint"]) / "model"
        summary: dict = {"task": TASK, "sft_questions": SFT_QUESTIONS, "rl_questions": RL_QUESTIONS,
                         "held_out_prompts": len(test), "sft_train_seconds": sft.get("train_seconds")}
        for key, model in (("init", model_dir), ("before", sft_model)):
            scores = held_out_scores(model, test)
            summary[f"format_{key}"], summary[f"accuracy_{key}"] = scores["format"], scores["accuracy"]
        print(f"[quickstart]     SFT done: held-out accuracy {summary['accuracy_before']:.0%}")

        if not args.skip_rl:
            print(f"[quickstart] 2/2 GRPO on {RL_QUESTIONS} other questions, vLLM rollouts, math_verify reward "
                  "(recipes/grpo.yaml); "
                  f"progress in {out / 'grpo.log'}")
            overrides = [f"output_dir={out / 'grpo'}", f"model.path={sft_model}", f"data.path={data['rl']}",
                         f"data.eval_path={data['test']}", f"seed={args.seed}", "overwrite=true"]
            if args.grpo_steps:
                overrides.append(f"train.max_steps={args.grpo_steps}")
            grpo = run_stage("grpo.yaml", overrides, out / "grpo.log")
            rl_model = Path(grpo["checkpoint"]) / "model"
            scores = held_out_scores(rl_model, test)
            summary.update(format_after=scores["format"], accuracy_after=scores["accuracy"],
                           grpo_train_seconds=grpo.get("train_seconds"), grpo_steps=grpo.get("steps"),
                           checkpoint=str(rl_model))
            plots = out / "plots"
            plots.mkdir(exist_ok=True)
            for name in GRPO_PLOTS:
                if (out / "grpo" / "plots" / name).is_file():
                    shutil.copy(out / "grpo" / "plots" / name, plots / name)
            summary["plots"] = str(plots)
        else:
            summary.update(format_after=summary["format_before"], accuracy_after=summary["accuracy_before"],
                           grpo_train_seconds=0.0, grpo_steps=0, checkpoint=str(sft_model),
                           plots=str(out / "sft" / "plots"))
    except UserError as err:
        print_user_error(err)
        return err.exit_code
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    print(f"[quickstart] checkpoint (Hugging Face format): {summary['checkpoint']}")
    print(f"[quickstart] plots: {summary['plots']}   summary: {out / 'summary.json'}")
    print(f"[quickstart] done in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
