"""Listwise reward-model training (``trainer: rm`` on rows with ``completions`` and ``ranks``/``scores``):
the first-step loss of every ranking loss against the loss computed independently on the initial model's
scores, learning on the shipped ranked answers, the saved model as the ``orm`` reward, 1 vs 2 processes,
LoRA with kill -9 and resume, and one-line errors for malformed rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli, write_jsonl

SHIPPED = REPO / "examples" / "data" / "listwise"
RECIPE = str(REPO / "recipes" / "rm_listwise.yaml")
QUIET = ("logging.progress=false", "logging.tensorboard=false", "logging.plots=false", "learner.warmup_steps=0")


def read_rows(path, n=None):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def batch_rows() -> list[dict]:
    """8 lists of 4, 3 and 2 completions, labelled by ranks (with a tie) or by non-negative scores."""
    rows = read_rows(SHIPPED / "train.jsonl", 8)
    rows[1]["ranks"] = [1 if r == 2 else r for r in rows[1]["ranks"]]  # a tie for the best
    short = rows[5]
    rows[5] = {"prompt": short["prompt"], "completions": short["completions"][:3],
               "scores": [0.5 * (5 - r) for r in short["ranks"][:3]]}
    pair = rows[6]
    first_better = pair["ranks"][0] < pair["ranks"][1]
    rows[6] = {"prompt": pair["prompt"], "completions": pair["completions"][:2], "ranks": [1, 2] if first_better else [2, 1]}
    rows[7] = {"prompt": rows[7]["prompt"], "completions": rows[7]["completions"],
               "scores": [float(4 - r) for r in rows[7]["ranks"]]}
    return rows


def labels_of(row: dict) -> list[float]:
    """Higher = better: the scores, or K - rank (what docs/preference-data.md promises)."""
    return row["scores"] if "scores" in row else [len(row["ranks"]) - r for r in row["ranks"]]


@pytest.fixture(scope="module")
def scoring_model(tiny_model, tmp_path_factory):
    """The tiny model with a fixed, saved reward head: the trainer loads exactly these weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(123)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("scoring") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def batch_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("lwbatch")
    return (write_jsonl(out / "train.jsonl", batch_rows()),
            write_jsonl(out / "test.jsonl", read_rows(SHIPPED / "test.jsonl", 8)))


def initial_scores(model_dir, rows) -> list[list[float]]:
    """Each completion scored alone (no padding, no batching) by the model as saved."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    scores = []
    with torch.no_grad():
        for row in rows:
            texts = [tokenizer.apply_chat_template(row["prompt"] + c, tokenize=False) for c in row["completions"]]
            scores.append([model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                           for t in texts])
    return scores


def hand_loss(method: str, s: list[float], y: list[float]) -> float:
    """The four losses written out from their papers' formulas, one list at a time, in plain Python."""
    k = len(s)
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    pairs = [(i, j) for i in range(k) for j in range(k) if y[i] > y[j]]
    if method == "pairwise_logistic":
        return sum(-math.log(sig(s[i] - s[j])) for i, j in pairs)
    if method == "lambda":
        order = sorted(range(k), key=lambda i: -s[i])
        tau = {i: pos + 1 for pos, i in enumerate(order)}
        gain = [2.0 ** v - 1 for v in y]
        return sum(abs(gain[i] - gain[j]) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))
                   * -math.log(sig(s[i] - s[j])) for i, j in pairs)
    if method == "listmle":
        order = sorted(range(k), key=lambda i: -y[i])  # stable: ties keep their order
        return sum(math.log(sum(math.exp(s[j]) for j in order[pos:])) - s[order[pos]] for pos in range(k))
    if method == "softmax":
        total = sum(math.exp(v) for v in s)
        return -sum(y[i] / sum(y) * (s[i] - math.log(total)) for i in range(k))
    raise AssertionError(method)


def _loss_names() -> list[str]:
    from posttrain.algorithms import RANKING_LOSSES

    return RANKING_LOSSES.names()


@pytest.mark.parametrize("method", _loss_names(), ids=lambda m: f"loss={m}")
def test_first_step_loss_matches_the_loss_of_the_initial_scores(method, scoring_model, batch_files, tmp_path):
    """One global batch = the whole file (8 lists, 2 micro-batches of 4, lists of 4, 3 and 2 padded to 4): the
    logged step-1 loss is the mean over lists of the ranking loss of the initial model's scores, computed here
    twice, with ``listwise_ranking_loss`` on padded tensors and with the formula by hand. Step 2 also runs."""
    from posttrain.algorithms import listwise_ranking_loss

    train, test = batch_files
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, f"model.path={scoring_model}", f"data.path={train}", f"data.eval_path={test}",
                     f"output_dir={out}", f"rm.ranking_loss={method}", "train.max_steps=2", "train.global_batch_size=8",
                     "train.micro_batch_size=4", "data.shuffle=false", "checkpoint.save_final=false", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {r["step"]: r for r in read_metrics(out) if "loss" in r and "lr" in r}
    assert sorted(steps) == [1, 2] and math.isfinite(steps[2]["loss"])

    rows = read_rows(train)
    scores = initial_scores(scoring_model, rows)
    width = max(len(s) for s in scores)
    padded = torch.zeros(len(rows), width)
    labels = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (s, row) in enumerate(zip(scores, rows)):
        padded[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(labels_of(row)), True
    expected = listwise_ranking_loss(padded, labels, mask, method=method).mean().item()
    by_hand = sum(hand_loss(method, s, labels_of(row)) for s, row in zip(scores, rows)) / len(rows)
    assert expected == pytest.approx(by_hand, rel=1e-5)
    assert steps[1]["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert steps[2]["loss"] != pytest.approx(steps[1]["loss"], rel=1e-6)  # the update changed the scores


@pytest.fixture(scope="module")
def shipped_subset(tmp_path_factory):
    out = tmp_path_factory.mktemp("lwdata")
    return (write_jsonl(out / "train.jsonl", read_rows(SHIPPED / "train.jsonl", 160)),
            write_jsonl(out / "test.jsonl", read_rows(SHIPPED / "test.jsonl", 48)))


def shipped_args(tiny_model, files, out, *extra):
    train, test = files
    return [f"model.path={tiny_model}", f"data.path={train}", f"data.eval_path={test}", f"output_dir={out}",
            "train.global_batch_size=16", "train.micro_batch_size=4", "train.eval_batch_size=16", *QUIET, *extra]


@pytest.fixture(scope="module")
def trained(tiny_model, shipped_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lwrun") / "run"
    result = run_cli("run", RECIPE, *shipped_args(tiny_model, shipped_subset, out, "train.max_steps=16"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_training_raises_held_out_pairwise_and_top1_accuracy(trained):
    """From the random tiny model, 16 LiPO-lambda steps on 160 ranked lists order held-out answers better."""
    summary = json.loads((trained / "summary.json").read_text())
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["accuracy"] > start["accuracy"] + 0.1, (start, end)
    assert end["top1_accuracy"] > start["top1_accuracy"], (start, end)
    assert end["loss"] < start["loss"] and end["margin"] > start["margin"]
    assert {"eval/accuracy", "eval/top1_accuracy", "eval/margin"} <= set(read_metrics(trained)[-1])


def test_saved_listwise_model_is_the_orm_reward(trained, shipped_subset):
    """The `orm` reward scores the held-out lists with the trained model; its pairwise and top-1 accuracy are
    the ones the trainer reported at the end."""
    accuracy, top1 = orm_accuracies(trained / "checkpoints" / "last" / "model", read_rows(shipped_subset[1]))
    end = json.loads((trained / "summary.json").read_text())["eval_end"]
    assert accuracy == pytest.approx(end["accuracy"], abs=1e-9)
    assert top1 == pytest.approx(end["top1_accuracy"], abs=1e-9)


def orm_accuracies(model_dir, rows) -> tuple[float, float]:
    """Pairwise accuracy (over ordered pairs with different labels) and top-1 accuracy of the `orm` reward."""
    from reward_models import load_reward

    reward = load_reward("orm", model=str(model_dir))
    pairs = right = top1 = 0
    for row in rows:
        scores = list(reward([row["prompt"]] * len(row["completions"]), row["completions"]))
        y = labels_of(row)
        for i in range(len(y)):
            for j in range(len(y)):
                if y[i] > y[j]:
                    pairs += 1
                    right += scores[i] > scores[j]
        top1 += y[max(range(len(y)), key=lambda i: scores[i])] == max(y)
    return right / pairs, top1 / len(rows)


def test_listwise_stats_count_pairs_ties_and_padding():
    from posttrain.trainers.reward_model_tasks import listwise_stats

    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.7, 9.0, 9.0]])
    labels = torch.tensor([[2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    stats = listwise_stats(scores, labels, mask)
    # list 1: pairs (0,2) (0,3) (1,2) (1,3) (2,3); (1,2) is ordered wrong. list 2: one pair, right; padding ignored.
    assert stats["pairs"].tolist() == [5.0, 1.0] and stats["pairs_correct"].tolist() == [4.0, 1.0]
    assert stats["top1"].tolist() == [1.0, 1.0]
    assert stats["margin"].tolist() == pytest.approx([2.0, 0.2])
    reversed_labels = torch.tensor([[0.0, 0.0, 1.0, 2.0], [1.0, 0.0, 5.0, 5.0]])  # padding's labels are ignored
    assert listwise_stats(scores, reversed_labels, mask)["top1"].tolist() == [0.0, 0.0]


def test_rank_labels_are_k_minus_rank():
    from posttrain.data.listwise import rank_labels

    assert rank_labels([1, 2, 2, 4]) == [3.0, 2.0, 2.0, 0.0]
    assert rank_labels([2, 1]) == [0.0, 1.0]


def test_shipped_listwise_data_is_what_make_data_writes(tmp_path):
    result = run_cli("make-data", "listwise", str(tmp_path), "--train", "600", "--test", "100")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("train", "test"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (SHIPPED / f"{name}.jsonl").read_text(), "regenerate"
    import re

    for row in read_rows(SHIPPED / "test.jsonl"):
        answer = int(row["answer"])
        claimed = [re.search(r"boxed\{(-?\d+)\}", c[0]["content"]) for c in row["completions"]]
        distance = [abs(int(m.group(1)) - answer) if m else math.inf for m in claimed]
        assert sorted(row["ranks"]) == [1, 2, 3, 4]
        assert [row["ranks"][i] for i in sorted(range(4), key=distance.__getitem__)] == [1, 2, 3, 4]
    train = {json.dumps(r["prompt"]) for r in read_rows(SHIPPED / "train.jsonl")}
    assert not train & {json.dumps(r["prompt"]) for r in read_rows(SHIPPED / "test.jsonl")}


@pytest.mark.slow
def test_two_processes_zero2_match_one_process(tiny_model, shipped_subset, tmp_path):
    """The same global batches on 1 process (ZeRO-0) and on 2 (ZeRO-2, each rank half of every batch): the same
    losses step by step, and the same held-out metrics at the end."""
    runs = {}
    for nproc, zero in ((1, 0), (2, 2)):
        out = tmp_path / f"p{nproc}"
        result = run_cli("run", RECIPE, "--nproc", str(nproc), f"learner.zero_stage={zero}",
                         *shipped_args(tiny_model, shipped_subset, out, "train.max_steps=3", "rm.ranking_loss=listmle"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = ([(r["step"], r["loss"]) for r in read_metrics(out) if "lr" in r],
                       json.loads((out / "summary.json").read_text())["eval_end"])
    (one, one_end), (two, two_end) = runs[1], runs[2]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert one[0][1] != pytest.approx(one[-1][1], rel=1e-4)  # it trained: equal losses are not a constant
    for key in ("loss", "accuracy", "top1_accuracy"):
        assert one_end[key] == pytest.approx(two_end[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_lora_kill_9_then_resume_matches_uninterrupted(tiny_model, shipped_subset, tmp_path):
    """LoRA, a checkpoint every 2 steps, kill -9 after step 3: resume=auto continues from step 2 and ends with the
    uninterrupted run's losses."""
    def args(out):
        return shipped_args(tiny_model, shipped_subset, out, "train.max_steps=4", "model.lora.enabled=true",
                            "checkpoint.every_n_steps=2", "rm.ranking_loss=pairwise_logistic")

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out) if "lr" in r}

    whole = run_cli("run", RECIPE, *args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    killed = run_cli("run", RECIPE, *args(cut), env={"POSTTRAIN_FAULT_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -9 and sorted(losses(cut)) == [1, 2, 3]
    resumed = run_cli("run", RECIPE, *args(cut), "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-000002" in resumed.stderr
    expected = losses(tmp_path / "whole")
    assert sorted(expected) == [1, 2, 3, 4]
    for step, loss in losses(cut).items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step
    # The merged model (backbone + adapter, and the head that trained in full) is the `orm` reward of the run.
    accuracy, _ = orm_accuracies(cut / "checkpoints" / "last" / "merged", read_rows(shipped_subset[1]))
    assert accuracy == pytest.approx(json.loads((cut / "summary.json").read_text())["eval_end"]["accuracy"], abs=1e-9)


GOOD = {"prompt": "What is 2 + 2?", "completions": [" 4", " 5", " 9"], "ranks": [1, 2, 3]}

MALFORMED = {
    "lengths_differ": (dict(GOOD, ranks=[1, 2]),
                       "field 'ranks' must be a list with one entry per completion (3), got 2 entries"),
    "both_ranks_and_scores": (dict(GOOD, scores=[1.0, 0.5, 0.0]), "exactly one of 'ranks' (1 = best) or 'scores' "
                              "(higher = better), got both"),
    "neither": ({"prompt": "p", "completions": ["a", "b"]}, "got neither"),
    "one_completion": (dict(GOOD, completions=[" 4"], ranks=[1]), "at least 2 responses to rank, got 1 item"),
    "non_numeric_score": ({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, "high"]},
                          "scores[1] must be a finite number, got 'high'"),
    "bool_rank": (dict(GOOD, ranks=[1, True, 3]), "ranks[1] must be a rank, got True"),
    "fractional_rank": (dict(GOOD, ranks=[1, 2.5, 3]), "ranks[1] must be an integer from 1 (best) to 3, got 2.5"),
    "rank_out_of_range": (dict(GOOD, ranks=[1, 2, 7]), "ranks[2] must be an integer from 1 (best) to 3, got 7"),
    "all_tied": (dict(GOOD, ranks=[1, 1, 1]), "every completion has the same rank; the list carries no preference"),
    "empty_completion": (dict(GOOD, completions=[" 4", "  ", " 9"]), "completions[1] is empty"),
    "mixed_message_kinds": ({"prompt": [{"role": "user", "content": "2 + 2?"}], "completions": ["4", "5"],
                             "ranks": [1, 2]}, "completions[0] must be a message list, as the prompt is one"),
    "bad_role": ({"prompt": [{"role": "user", "content": "2 + 2?"}], "ranks": [1, 2],
                  "completions": [[{"role": "assistant", "content": "4"}], [{"role": "bot", "content": "5"}]]},
                 "completions[1][0] has role 'bot'"),
    "also_paired": (dict(GOOD, chosen=" 4"), "has both 'completions' (a listwise row) and 'chosen'/'rejected'"),
    "prm_row": ({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}, "trainer: prm"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_row_names_file_row_and_field(case):
    from posttrain.data.formats import check_listwise
    from posttrain.data.loading import Row
    from posttrain.errors import DataError

    bad, message = MALFORMED[case]
    with pytest.raises(DataError) as caught:
        check_listwise(Row(bad, "my/lists.jsonl", 3))
    assert caught.value.message.startswith("my/lists.jsonl, row 3: ")
    assert message in caught.value.message
    check_listwise(Row(GOOD, "my/lists.jsonl", 1))  # the good row it was made from passes


MIXED = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(("bad", "message"), [
    MALFORMED["lengths_differ"], MALFORMED["non_numeric_score"],
    (MIXED, "mixes listwise rows with 'completions' (first: {path}, row 1) and paired rows with 'chosen'/'rejected' "
            "(first: {path}, row 3)"),
], ids=["lengths_differ", "non_numeric_score", "paired_row_in_listwise_file"])
def test_malformed_file_stops_the_run_with_one_line_exit_2(bad, message, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "lists.jsonl", [GOOD, GOOD, bad, GOOD])
    result = run_cli("run", RECIPE, f"model.path={tiny_model}", f"data.path={path}", "data.eval_path=null",
                     f"output_dir={tmp_path / 'run'}", "train.global_batch_size=2", "train.micro_batch_size=1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.format(path=path) in lines[0], result.stderr[-2000:]
    assert f"{path}, row 3" in lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_ranking_loss_lists_the_valid_names(tiny_model, tmp_path):
    result = run_cli("run", RECIPE, f"model.path={tiny_model}", "rm.ranking_loss=lamda", f"output_dir={tmp_path}/r")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "rm.ranking_loss" in line and "lambda, listmle, pairwise_logistic, softmax" in line
    assert "Did you mean 'lambda'?" in line


def test_softmax_refuses_negative_scores_naming_the_row(tmp_path):
    from posttrain.config.schema import DataConfig
    from posttrain.data.listwise import load_listwise
    from posttrain.errors import DataError

    rows = [{"prompt": "p", "completions": ["a", "b"], "scores": [1.0, 0.0]},
            {"prompt": "p", "completions": ["a", "b"], "scores": [0.5, -1.5]}]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "s.jsonl", rows)), eval_fraction=0.0)
    with pytest.raises(DataError, match=r"row 2: field 'scores' has a negative value \(-1.5\).*softmax"):
        load_listwise(cfg, 0, tokenizer=None, nonnegative=True)


def test_paired_data_still_trains_pairwise_and_lora_saves_a_merged_orm(tiny_model, tmp_path):
    """Paired rows take the Bradley-Terry task as before (no listwise metrics); with LoRA the backbone gets
    adapters, the new head trains in full, and the merged model is the `orm` reward."""
    rows = read_rows(REPO / "examples" / "data" / "preference" / "train.jsonl", 32)
    train, test = write_jsonl(tmp_path / "pairs.jsonl", rows[:24]), write_jsonl(tmp_path / "eval.jsonl", rows[24:])
    out = tmp_path / "run"
    result = run_cli("run", str(REPO / "recipes" / "rm.yaml"), *shipped_args(tiny_model, (train, test), out),
                     "train.max_steps=2", "train.global_batch_size=8", "model.lora.enabled=true")
    assert result.returncode == 0, result.stderr[-3000:]
    end = json.loads((out / "summary.json").read_text())["eval_end"]
    assert "top1_accuracy" not in end and {"accuracy", "reward/chosen"} <= set(end)
    from reward_models import load_reward

    reward = load_reward("orm", model=str(out / "checkpoints" / "last" / "merged"))
    held = read_rows(test)
    chosen = reward([r["prompt"] for r in held], [r["chosen"] for r in held])
    rejected = reward([r["prompt"] for r in held], [r["rejected"] for r in held])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held) == pytest.approx(end["accuracy"], abs=1e-9)
    assert sum(chosen) / len(held) == pytest.approx(end["reward/chosen"], rel=1e-4, abs=1e-5)


def test_lora_on_a_scoring_model_trains_adapters_and_the_head(tiny_model):
    from posttrain.config.schema import LoraConfig, ModelConfig
    from posttrain.learner.engine import apply_lora
    from posttrain.models.heads import load_scoring_model
    from posttrain.trainers.reward_model import SCORING_HEADS

    model = load_scoring_model(ModelConfig(path=str(tiny_model)), "sequence", 0)
    wrapped = apply_lora(model, LoraConfig(enabled=True), task_type=None, train_in_full=SCORING_HEADS)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert "base_model.model.score.weight" in trainable
    assert trainable - {"base_model.model.score.weight"} and all("lora_" in n for n in trainable - {"base_model.model.score.weight"})


def test_overlong_lists_are_truncated_dropped_or_refused():
    from posttrain.data.listwise import ListwiseExample, fit_listwise
    from posttrain.data.tokenize import LengthReport
    from posttrain.errors import DataError, InvalidRow

    example = ListwiseExample([1, 2, 3], [[4, 5, 6, 7], [8], [9, 9]], [2.0, 1.0, 0.0])
    report = LengthReport()
    assert fit_listwise(example, 7, "truncate", "f, row 1", report) is example  # 3 + 4 fits
    cut = fit_listwise(example, 5, "truncate", "f, row 1", report)
    assert cut.completion_ids == [[4, 5], [8], [9, 9]] and cut.labels == example.labels and report.truncated == 1
    assert fit_listwise(example, 5, "drop", "f, row 1", report) is None and report.dropped_too_long == 1
    with pytest.raises(DataError, match="f, row 1: 7 tokens"):
        fit_listwise(example, 5, "error", "f, row 1", report)
    with pytest.raises(InvalidRow, match="the prompt alone fills"):
        fit_listwise(example, 3, "truncate", "f, row 1", report)
