"""``judge``: a generative reward model (LLM-as-judge) served by a vLLM engine.

A judge model reads a prompt made from a template (the task's prompt, the completion and,
optionally, a reference answer from a dataset column) and its output becomes the score, by one
of two rules:

  - ``tag``: the judge writes a verdict; the number inside the last ``<score>...</score>`` tag
    (the tag name is a setting) is the score. It must lie in ``[min_score, max_score]``; with
    ``normalize`` (default) it is mapped to ``(x - min_score) / (max_score - min_score)`` in
    [0, 1], else kept as written. Greedy by default (``temperature`` 0).
  - ``yes_no``: no text is generated; the score is P(yes) / (P(yes) + P(no)) for the judge's next
    token after the prompt, from the engine's full-vocabulary log-probs of the yes and no tokens
    (one greedy step). It lies in (0, 1).

A row whose verdict cannot be read (no tag, not a number, out of range, a yes/no probability
that does not exist, a prompt too long for the engine, a missing reference) gets a
``parse_error`` in its ``reward_info`` and is reported in ``RewardOutput.errors``: the reward
set's failure policy decides (``fail`` stops, ``zero`` scores 0 and counts it).

The engine is the judge's own (``engine: own``, default: a ``RolloutEngine`` on ``model``,
started on first use or when an online trainer binds engines), or the policy's
(``engine: policy``: the GRPO/PPO trainer hands its colocated rollout engine over through
``bind_engine``; the judge then scores with the current policy weights).

The pure helpers (``render_template``, ``parse_tag_score``, ``yes_no_score``) are public for tests
and custom judges.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

from posttrain.errors import ConfigError, UserError
from reward_models.registry import reward_factory
from reward_models.text import completion_text
from reward_models.types import Column, RewardOutput

RULES = ("tag", "yes_no")
ENGINES = ("own", "policy")
CHAT_MODES = ("auto", True, False)
# One judge at a time in a process: a reward set calls its rewards concurrently (threads), and two vLLM engines
# starting or stepping at once in one process hang.
_ENGINES_LOCK = threading.RLock()

_TAG_INSTRUCTIONS = ("Rate the response from {low} to {high}, where {high} is best. Think briefly if you need to, "
                     "then end with the rating inside tags, like <{tag}>{example}</{tag}>.\n")
_YES_NO_INSTRUCTIONS = "Is the response correct? Answer yes or no.\n"


def default_template(rule: str, *, with_reference: bool, tag: str = "score", low: float = 0, high: float = 10) -> str:
    """The built-in template for a rule, with or without a reference section."""
    parts = ["You are judging the response of an assistant.\n\n", "[Question]\n{prompt}\n\n"]
    if with_reference:
        parts.append("[Reference answer]\n{reference}\n\n")
    parts.append("[Response]\n{completion}\n\n")
    if rule == "tag":
        example = _number(round((low + high) / 2, 6))
        parts.append(_TAG_INSTRUCTIONS.format(low=_number(low), high=_number(high), tag=tag, example=example))
    else:
        parts.append(_YES_NO_INSTRUCTIONS)
    return "".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def render_template(template: str, prompt: str, completion: str, reference: str | None = None) -> str:
    """The judge's prompt: ``{prompt}``, ``{completion}`` and ``{reference}`` replaced by the row's text.

    Only those three placeholders are replaced, so other braces (JSON in a template) stay as written,
    and a placeholder inside the inserted text is never expanded again.
    """
    values = {"prompt": prompt, "completion": completion, "reference": "" if reference is None else reference}
    return re.sub(r"\{(prompt|completion|reference)\}", lambda m: values[m.group(1)], template)


def as_text(value: object) -> str:
    """A prompt or reference as text: strings as they are, message lists as ``role: content`` lines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in value)
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


class ParseError(ValueError):
    """The judge's output holds no readable verdict; the message says why."""


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_tag_score(text: str, *, tag: str = "score", min_score: float = 0.0, max_score: float = 10.0,
                    normalize: bool = True) -> tuple[float, float]:
    """(score, raw number) from the last ``<tag>N</tag>`` in ``text``; ``ParseError`` otherwise.

    Tag names match without regard to case; whitespace around the number is allowed. A final tag left
    open at the end of the text (generation stopped at ``</tag>``) counts. ``normalize``: the score is
    ``(N - min_score) / (max_score - min_score)``, else N itself.
    """
    name = re.escape(tag)
    spans = re.findall(rf"<{name}>(.*?)(?:</{name}>|\Z)", text, flags=re.IGNORECASE | re.DOTALL)
    if not spans:
        raise ParseError(f"no <{tag}>...</{tag}> tag in the judge's output")
    content = spans[-1].strip()
    if not _NUMBER.fullmatch(content):
        raise ParseError(f"the last <{tag}> tag holds {content[:40]!r}, not a number")
    raw = float(content)
    if not math.isfinite(raw) or not min_score <= raw <= max_score:
        raise ParseError(f"the score {content} is outside [{_number(min_score)}, {_number(max_score)}]")
    if not normalize:
        return raw, raw
    return (raw - min_score) / (max_score - min_score), raw


def yes_no_score(yes_logprobs: list[float], no_logprobs: list[float]) -> float:
    """P(yes) / (P(yes) + P(no)) from the log-probs of the yes tokens and of the no tokens (each side's
    probability is the sum over its tokens); ``ParseError`` when neither side has any probability."""
    def logsumexp(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        top = max(finite, default=-math.inf)
        if top == -math.inf:
            return -math.inf
        return top + math.log(sum(math.exp(v - top) for v in finite))

    yes, no = logsumexp(list(yes_logprobs)), logsumexp(list(no_logprobs))
    if yes == -math.inf and no == -math.inf:
        raise ParseError("the judge gives the yes and no tokens no probability")
    if no == -math.inf:
        return 1.0
    return 1.0 / (1.0 + math.exp(no - yes))  # sigmoid(log P(yes) - log P(no))


def _token_list(value: object, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(v, str) and v for v in items):
        raise UserError(f"judge: {what} must be a non-empty string or a list of them, got {value!r}.")
    return items


class Judge:
    """The reward (see the module docstring); the engine starts on first use."""

    __name__ = "judge"

    def __init__(self, *, model: str | None, rule: str, engine: str, template: str | None, template_file: str | None,
                 reference: str | None, chat: str | bool, tag: str, min_score: float, max_score: float,
                 normalize: bool, yes_token: str | list[str], no_token: str | list[str], temperature: float,
                 max_tokens: int, stop: list[str] | None, seed: int, max_model_len: int | None, dtype: str,
                 enforce_eager: bool, memory_fraction: float, max_num_seqs: int) -> None:
        if rule not in RULES:
            raise UserError(f"judge: rule must be one of {', '.join(RULES)}, got {rule!r}.")
        if engine not in ENGINES:
            raise UserError(f"judge: engine must be 'own' (a judge model of its own) or 'policy' (the rollout "
                            f"engine of the online trainer), got {engine!r}.")
        if engine == "own" and not model:
            raise UserError("judge needs the argument 'model' (a local model directory) with engine: own.",
                            hint="Give it in the recipe's args, or with --reward-arg model=PATH; or set "
                            "engine: policy in a GRPO/PPO recipe to judge with the policy itself.")
        if engine == "policy" and model:
            raise UserError("judge: with engine: policy the judge is the policy's rollout engine; leave 'model' out.")
        if isinstance(chat, str) and chat.lower() in ("true", "false"):
            chat = chat.lower() == "true"
        if chat not in CHAT_MODES:
            raise UserError(f"judge: chat must be auto, true or false, got {chat!r}.")
        if template is not None and template_file is not None:
            raise UserError("judge: give template or template_file, not both.")
        if template_file is not None:
            path = Path(template_file).expanduser()
            if not path.is_file():
                raise UserError(f"judge: template_file {str(path)!r} does not exist.")
            template = path.read_text(encoding="utf-8")
        if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
            raise UserError(f"judge: tag must be a tag name such as 'score', got {tag!r}.")
        min_score, max_score = float(min_score), float(max_score)
        if not (math.isfinite(min_score) and math.isfinite(max_score) and min_score < max_score):
            raise UserError(f"judge: min_score ({min_score:g}) must be below max_score ({max_score:g}).")
        if template is None:
            template = default_template(rule, with_reference=reference is not None, tag=tag, low=min_score,
                                        high=max_score)
        if "{completion}" not in template:
            raise UserError("judge: the template has no {completion} placeholder, so the judge would never see "
                            "the completion.", hint="Placeholders: {prompt}, {completion}, {reference}.")
        if "{reference}" in template and reference is None:
            raise UserError("judge: the template uses {reference}, but no reference column is named.",
                            hint="Set reference to the dataset column that holds it, e.g. reference: answer.")
        if float(temperature) < 0 or int(max_tokens) < 1 or int(max_num_seqs) < 1:
            raise UserError("judge: temperature must be 0 or more, max_tokens and max_num_seqs at least 1.")
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise UserError(f"judge: stop must be a list of non-empty strings, got {stop!r}.")
        self.model, self.rule, self.engine_mode, self.template = model, rule, engine, template
        self.reference, self.chat, self.tag = reference, chat, tag
        self.min_score, self.max_score, self.normalize = min_score, max_score, bool(normalize)
        self.yes_tokens, self.no_tokens = _token_list(yes_token, "yes_token"), _token_list(no_token, "no_token")
        self.temperature, self.max_tokens, self.stop, self.seed = float(temperature), int(max_tokens), stop, int(seed)
        self.engine_settings = {"max_model_len": max_model_len, "dtype": dtype, "enforce_eager": bool(enforce_eager),
                                "memory_fraction": float(memory_fraction), "max_num_seqs": int(max_num_seqs)}
        self.reward_columns = (
            (Column(reference, (str, int, float, list), "the reference the judge compares with"),) if reference else ())
        self._engine = None  # the judge's own engine, or the policy's once bound
        self._owned = False
        self._token_ids: tuple[list[int], list[int]] | None = None
        self._lock = _ENGINES_LOCK

    # ---- the engine ----------------------------------------------------------------------------
    def bind_engine(self, engine) -> None:
        """Called by the online trainers once their rollout engine has started. ``engine: policy`` takes it
        (it must be an in-process ``RolloutEngine``); ``engine: own`` starts its own engine now, so its
        start-up is not counted against the first reward call's time limit."""
        if self.engine_mode == "own":
            self.start()
            return
        from posttrain.rollout.engine import RolloutEngine

        if not isinstance(engine, RolloutEngine) or engine.cfg.tensor_parallel_size != 1:
            raise ConfigError(
                "the judge reward with engine: policy needs the policy's rollout engine in this process: "
                "rollout.placement colocated and rollout.tensor_parallel_size 1.",
                hint="Or give the judge a model of its own (engine: own, model: PATH).")
        with self._lock:
            self._engine, self._owned, self._token_ids = engine, False, None

    def start(self):
        """The engine, started if it is the judge's own and not running yet."""
        with self._lock:
            if self._engine is not None:
                return self._engine
            if self.engine_mode == "policy":
                raise UserError(
                    "the judge reward has engine: policy, but no rollout engine was handed to it.",
                    hint="engine: policy works inside a GRPO/PPO recipe (colocated, isolation: thread); elsewhere "
                    "(posttrain score, process isolation) give the judge a model: engine: own, model: PATH.")
            if not Path(self.model).is_dir():
                raise UserError(f"judge: model directory {self.model!r} does not exist.",
                                hint="Give a local directory with a causal LM and its tokenizer (save_pretrained).")
            from posttrain.rollout.config import RolloutConfig
            from posttrain.rollout.engine import RolloutEngine

            settings = {k: v for k, v in self.engine_settings.items() if v is not None}
            cfg = RolloutConfig(model=self.model, n=1, seed=self.seed, stop=[], enable_prefix_caching=True,
                                **settings)
            try:
                cfg.validate("the judge reward's settings")
            except ConfigError as err:
                raise UserError(str(err).replace("rollout.", "judge: ")) from None
            self._engine, self._owned = RolloutEngine(self.model, cfg), True
            return self._engine

    def _tokens(self, engine) -> tuple[list[int], list[int]]:
        """The token ids of the yes and no strings under the judge's tokenizer (each must be one token)."""
        if self._token_ids is None:
            sides = []
            for what, strings in (("yes_token", self.yes_tokens), ("no_token", self.no_tokens)):
                ids = []
                for s in strings:
                    encoded = list(engine.tokenizer(s, add_special_tokens=False).input_ids)
                    if len(encoded) != 1:
                        raise UserError(f"judge: {what} {s!r} is {len(encoded)} tokens {encoded} for the judge's "
                                        "tokenizer; each yes/no string must be exactly one token.",
                                        hint="Try another spelling (with or without a leading space, another case).")
                    ids.append(encoded[0])
                sides.append(ids)
            if set(sides[0]) & set(sides[1]):
                raise UserError("judge: yes_token and no_token share a token.")
            self._token_ids = sides[0], sides[1]
        return self._token_ids

    def _wrap(self, engine, text: str):
        """The engine's prompt: the text as one user message (chat template) or as plain text."""
        has_template = bool(getattr(engine.tokenizer, "chat_template", None))
        if self.chat is True and not has_template:
            raise UserError("judge: chat is true, but the judge model's tokenizer has no chat template.",
                            hint="Set chat: auto or false to send the prompt as plain text.")
        if self.chat is True or (self.chat == "auto" and has_template):
            return [{"role": "user", "content": text}]
        return text

    # ---- scoring -------------------------------------------------------------------------------
    def judge_prompts(self, prompts: list, completions: list, references: list | None = None) -> list[str]:
        """The judge's prompt text of each row (before any chat template)."""
        references = references if references is not None else [None] * len(prompts)
        return [render_template(self.template, as_text(p), completion_text(c), None if r is None else as_text(r))
                for p, c, r in zip(prompts, completions, references, strict=True)]

    def __call__(self, prompts: list, completions: list, **columns) -> RewardOutput:
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [""] * n
        references = None
        if self.reference is not None:
            if self.reference not in columns:
                raise KeyError(f"the judge needs a {self.reference!r} column with the references")
            references = list(columns[self.reference])
        scores: list[float | None] = [None] * n
        info: list[dict] = [{} for _ in range(n)]
        errors: dict[int, str] = {}
        texts = self.judge_prompts(prompts, completions, references)
        with self._lock:
            engine = self.start()
            todo, inputs = [], []
            for i, text in enumerate(texts):
                if references is not None and references[i] is None:
                    info[i]["parse_error"] = errors[i] = f"the row has no {self.reference!r} (the reference)"
                    continue
                ids = engine.tokenize(self._wrap(engine, text))
                room = 1 if self.rule == "yes_no" else 2
                if len(ids) + room > engine.max_model_len:
                    info[i]["parse_error"] = errors[i] = (f"the judge's prompt has {len(ids)} tokens; max_model_len "
                                                          f"({engine.max_model_len}) leaves no room for a verdict")
                    continue
                todo.append(i)
                inputs.append(ids)
            if todo:
                asleep = engine.is_sleeping
                try:
                    if self.rule == "tag":
                        self._score_tags(engine, todo, inputs, scores, info, errors)
                    else:
                        self._score_yes_no(engine, todo, inputs, scores, info, errors)
                finally:
                    if asleep and not self._owned:
                        engine.sleep()  # the policy's engine goes back to sleep while the learner trains
        for i, message in errors.items():
            errors[i] = f"judge: {message}"
        return RewardOutput(scores, info=info, errors=errors)

    def _score_tags(self, engine, todo, inputs, scores, info, errors) -> None:
        batch = engine.generate(inputs, n=1, temperature=self.temperature, top_p=1.0, top_k=0,
                                max_tokens=self.max_tokens, stop=self.stop or [], seed=self.seed)
        for i, sample in zip(todo, batch.samples, strict=True):
            info[i]["judge_output"] = sample.text if len(sample.text) <= 2000 else sample.text[:2000] + "..."
            try:
                scores[i], info[i]["raw_score"] = parse_tag_score(
                    sample.text, tag=self.tag, min_score=self.min_score, max_score=self.max_score,
                    normalize=self.normalize)
            except ParseError as err:
                info[i]["parse_error"] = errors[i] = str(err)

    def _score_yes_no(self, engine, todo, inputs, scores, info, errors) -> None:
        yes_ids, no_ids = self._tokens(engine)
        rows = engine.next_token_logprobs(inputs, yes_ids + no_ids)
        for i, row in zip(todo, rows, strict=True):
            yes, no = row[:len(yes_ids)], row[len(yes_ids):]
            info[i]["logprob_yes"] = yes[0] if len(yes) == 1 else yes
            info[i]["logprob_no"] = no[0] if len(no) == 1 else no
            try:
                scores[i] = yes_no_score(yes, no)
            except ParseError as err:
                info[i]["parse_error"] = errors[i] = str(err)

    def close(self) -> None:
        with self._lock:
            if self._owned and self._engine is not None:
                self._engine.close()
            self._engine, self._owned = None, False


@reward_factory
def judge(*, model: str | None = None, rule: str = "tag", engine: str = "own", template: str | None = None,
          template_file: str | None = None, reference: str | None = None, chat: str | bool = "auto",
          tag: str = "score", min_score: float = 0.0, max_score: float = 10.0, normalize: bool = True,
          yes_token: str | list[str] = "yes", no_token: str | list[str] = "no", temperature: float = 0.0,
          max_tokens: int = 256, stop: list[str] | None = None, seed: int = 0, max_model_len: int | None = None,
          dtype: str = "auto", enforce_eager: bool = False, memory_fraction: float = 0.3,
          max_num_seqs: int = 64) -> Judge:
    """An LLM judge (see the module docstring and docs/rewards.md, "LLM judges")."""
    return Judge(model=None if model is None else str(model), rule=rule, engine=engine, template=template,
                 template_file=template_file, reference=reference, chat=chat, tag=tag, min_score=min_score,
                 max_score=max_score, normalize=normalize, yes_token=yes_token, no_token=no_token,
                 temperature=temperature, max_tokens=max_tokens, stop=stop, seed=seed, max_model_len=max_model_len,
                 dtype=dtype, enforce_eager=enforce_eager, memory_fraction=memory_fraction, max_num_seqs=max_num_seqs)
