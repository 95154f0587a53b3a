"""Example user rewards, loadable by file path.

    posttrain score --reward ./examples/rewards/my_rewards.py:keyword_bonus \
        --reward-arg keyword=therefore examples/rewards/sample.jsonl --output scored.jsonl

    posttrain score --reward ./examples/rewards/my_rewards.py:answer_length \
        --reward-arg target=12 examples/rewards/sample.jsonl --output scored.jsonl

In a recipe: ``rewards: [{name: ./examples/rewards/my_rewards.py:keyword_bonus, weight: 0.1,
args: {keyword: therefore}}]``.
"""

from reward_models import RewardOutput, reward_factory


def keyword_bonus(prompts, completions, keyword="therefore", **columns):
    """A plain reward function (TRL's signature): 1.0 when the completion uses ``keyword``.

    ``keyword`` is a setting (bound from the recipe's args or --reward-arg); every other
    keyword argument is a dataset column, batched, so ``**columns`` takes the rest.
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if keyword in t.lower() else 0.0 for t in texts]


@reward_factory
def answer_length(*, target: int = 20):
    """A factory: called once with its settings, returns the reward function.

    It returns a ``RewardOutput`` so each row's ``reward_info`` says how long the answer was,
    and ``None`` (no opinion) for rows without an ``answer`` column value.
    """

    def reward(prompts, completions, answer=None, **columns):
        answers = answer if answer is not None else [None] * len(completions)
        scores, info = [], []
        for completion, gold in zip(completions, answers, strict=True):
            if gold is None:
                scores.append(None)
                info.append({"skipped": "no answer column"})
                continue
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            words = len(text.split())
            scores.append(max(0.0, 1.0 - abs(words - target) / target))
            info.append({"words": words})
        return RewardOutput(scores, info)

    return reward
