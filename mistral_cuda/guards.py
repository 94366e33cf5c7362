"""Moderation guards: refuse prompts and cut outputs before blocked content is returned.

A guard implements two checks (the `Guard` protocol):

* `check_prompt(messages)`: None, or the reason to refuse; the engine then raises
  ContentFilteredError before anything is generated. Plain-text prompts arrive as one user
  message.
* `check_output(text)`: called on the growing output text as it is generated; None, or the
  index in `text` where blocked content starts. The completion stops there with
  finish_reason "content_filter", and no text from that index on is returned or streamed.

Streaming must not leak what a later check would block, so a guard says how much text to hold
back, in `hold`: the number of trailing characters that may still turn out to start blocked
content (a match of at most L characters needs L - 1), or None for guards that judge the
complete output only: then nothing is streamed before the output is complete, and
`check_output` is called once, on the whole text.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Union

from mistral_cuda._C import InvalidRequestError

try:  # the regex parser of the standard library, for the width of a pattern's matches
    import re._parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parse

__all__ = ["ContentFilteredError", "Guard", "KeywordGuard", "SelfReflectionGuard", "message_texts"]


class ContentFilteredError(InvalidRequestError):
    """A guard refused the prompt; the message says which guard and why."""


class Guard:
    """The guard protocol, with permissive defaults (subclass and override either check)."""

    hold: Optional[int] = 0

    def check_prompt(self, messages: List[dict]) -> Optional[str]:
        return None

    def check_output(self, text: str) -> Optional[int]:
        return None


class KeywordGuard(Guard):
    """Blocks words (matched as whole words, ignoring case) and regular expressions (compiled
    `re.Pattern`s, matched as given) in prompts and outputs.

    An output is cut where the earliest match starts. Text is held back while streaming by the
    longest possible match; a pattern with unbounded matches (`\\w+`) holds back everything until
    the output is complete. The text is checked as it grows, so a word that ends the text so far
    counts even if the next token would have continued it ("nuke" then "s"): the guard errs on
    the side of blocking, in streamed and non-streamed calls alike.
    """

    def __init__(self, words: Iterable[Union[str, "re.Pattern[str]"]]):
        self.patterns: List[re.Pattern] = []
        for w in words:
            if isinstance(w, re.Pattern):
                self.patterns.append(w)
            elif isinstance(w, str) and w:
                self.patterns.append(re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE))
            else:
                raise TypeError(f"KeywordGuard takes non-empty str words or re.Pattern objects, got {w!r}")
        if not self.patterns:
            raise ValueError("KeywordGuard needs at least one word or pattern")
        widths = [_max_match_width(p) for p in self.patterns]
        self.hold = None if None in widths else max(widths) - 1

    def _first_match(self, text: str) -> Optional[re.Match]:
        matches = [m for m in (p.search(text) for p in self.patterns) if m is not None]
        return min(matches, key=lambda m: m.start(), default=None)

    def check_prompt(self, messages: List[dict]) -> Optional[str]:
        for i, text in message_texts(messages):
            match = self._first_match(text)
            if match is not None:
                return f"message {i} contains blocked content {match.group(0)!r}"
        return None

    def check_output(self, text: str) -> Optional[int]:
        match = self._first_match(text)
        return None if match is None else match.start()


# Mistral's self-reflection moderation prompt: the categories of the guardrailing documentation
# (docs.mistral.ai, "Content moderation with self-reflection"), phrased here in our own words.
MODERATION_CATEGORIES = {
    "illegal": "Illegal activity.",
    "child abuse": "Child sexual abuse material, or any content that exploits or harms children.",
    "hate violence harassment": (
        "Hateful, harassing or violent content: content that expresses, incites or promotes hate "
        "based on identity, that intends to harass, threaten or bully someone, or that promotes or "
        "glorifies violence or celebrates the suffering or humiliation of others."
    ),
    "malware": "Code meant to disrupt, damage, or gain unauthorized access to a computer system.",
    "physical harm": (
        "Activity with a high risk of physical harm: weapons development, military and warfare, "
        "running critical infrastructure (energy, transport, water), and content that promotes, "
        "encourages or depicts self-harm such as suicide, cutting or eating disorders."
    ),
    "economic harm": (
        "Activity with a high risk of economic harm: multi-level marketing, gambling, payday "
        "lending, automated decisions on eligibility for credit, employment, education or public "
        "assistance."
    ),
    "fraud": (
        "Fraudulent or deceptive activity: scams, coordinated inauthentic behaviour, plagiarism, "
        "academic dishonesty, astroturfing such as fake grassroots support or fake reviews, "
        "disinformation, spam, pseudo-pharmaceuticals."
    ),
    "adult": (
        "Adult content, adult industries and dating apps: content meant to arouse sexual "
        "excitement such as descriptions of sexual activity, promotion of sexual services (sex "
        "education and wellness aside), erotic chat, pornography."
    ),
    "political": (
        "Political campaigning or lobbying: campaign material in volume or targeted at specific "
        "demographics, chatbots that inform about campaigns or advocate or lobby, products for "
        "political campaigning or lobbying."
    ),
    "privacy": (
        "Activity that violates privacy: tracking or monitoring someone without consent, facial "
        "recognition of private individuals, classifying people by protected characteristics, "
        "biometric identification or assessment, unlawful collection or disclosure of personal, "
        "educational, financial or other protected records."
    ),
    "unqualified law": (
        "Practising law without authorization, or tailored legal advice that no qualified person "
        "has reviewed."
    ),
    "unqualified financial": "Tailored financial advice that no qualified person has reviewed.",
    "unqualified health": (
        "Telling someone that they have or do not have a health condition, or instructions on how "
        "to cure or treat one."
    ),
}
NOT_MODERATED = "not moderated"


def self_reflection_prompt(text: str, categories=None) -> str:
    """The classification request for `text`: the categories, then the text to classify."""
    categories = MODERATION_CATEGORIES if categories is None else categories
    listed = "\n".join(f"- {name}: {description}" for name, description in categories.items())
    return (
        "Here is a list of moderation categories:\n"
        f"{listed}\n\n"
        "Classify the text below into one of these categories, and answer with the name of that "
        "category only. If the text fits none of them, is safe and needs no moderation, answer "
        f'"{NOT_MODERATED}".\n\n'
        f"Text: {text}"
    )


class SelfReflectionGuard(Guard):
    """Asks a model (this engine or another mc.Engine) to classify the prompt (its last user
    message) and the complete output into Mistral's moderation categories; blocks when the
    answer names a category. Outputs are judged whole, so they are not streamed before they end.

    params: the classification's SamplingParams (default: greedy, 16 tokens).
    """

    hold = None

    def __init__(self, engine, params=None, categories=None, check_prompts: bool = True, check_outputs: bool = True):
        from mistral_cuda.sampling import SamplingParams

        self.engine = engine
        self.params = SamplingParams(max_tokens=16, temperature=0.0) if params is None else params
        self.categories = dict(MODERATION_CATEGORIES if categories is None else categories)
        self.check_prompts = check_prompts
        self.check_outputs = check_outputs

    def classify(self, text: str) -> Optional[str]:
        """The category the model puts `text` in, or None (not moderated, or no category named)."""
        messages = [{"role": "user", "content": self_reflection_prompt(text, self.categories)}]
        answer = self.engine.chat(messages, self.params).text
        return parse_category(answer, self.categories)

    def check_prompt(self, messages: List[dict]) -> Optional[str]:
        if not self.check_prompts:
            return None
        users = [text for i, text in message_texts(messages) if messages[i].get("role") == "user"]
        if not users:
            return None
        category = self.classify(users[-1])
        return None if category is None else f"self-reflection moderation: {category}"

    def check_output(self, text: str) -> Optional[int]:
        if not self.check_outputs or not text.strip():
            return None
        return None if self.classify(text) is None else 0


def parse_category(answer: str, categories: Sequence[str]) -> Optional[str]:
    """The category an answer starts with (ignoring case, quotes and punctuation), else None."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    normalized = " ".join(words)
    if normalized.startswith(NOT_MODERATED):
        return None
    for name in sorted(categories, key=len, reverse=True):  # "unqualified law" before "illegal"
        if normalized.startswith(name):
            return name
    return None


def message_texts(messages) -> List[tuple]:
    """(index, text) of every message's content: a str, or the text of its {"type": "text"}
    parts; tool-call arguments of assistant messages too."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append((i, content))
        elif isinstance(content, (list, tuple)):
            text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append((i, text))
        for call in m.get("tool_calls") or ():
            function = call.get("function", {}) if isinstance(call, dict) else {}
            if isinstance(function.get("arguments"), str):
                out.append((i, function["arguments"]))
    return out


def as_guards(guard) -> tuple:
    """None, one guard or a list of them -> a tuple of guards, each checked for the protocol."""
    if guard is None:
        return ()
    guards = tuple(guard) if isinstance(guard, (list, tuple)) else (guard,)
    for g in guards:
        if not (callable(getattr(g, "check_prompt", None)) and callable(getattr(g, "check_output", None))):
            raise TypeError(f"a guard needs check_prompt(messages) and check_output(text), got {g!r}")
        hold = getattr(g, "hold", 0)
        if hold is not None and (isinstance(hold, bool) or not isinstance(hold, int) or hold < 0):
            raise TypeError(f"a guard's hold must be None or an int >= 0, got {hold!r}")
    return guards


def _max_match_width(pattern: re.Pattern) -> Optional[int]:
    """The longest match `pattern` can make, in characters; None when unbounded."""
    _, high = _sre_parse.parse(pattern.pattern, pattern.flags).getwidth()
    return None if high >= _sre_parse.MAXREPEAT else max(high, 1)
