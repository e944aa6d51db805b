"""Small labelled prompt sets, built in code, for probing without a download.

They are deliberately simple and documented so a result can be read against them:

* :func:`sentiment` — short reviews, positive or negative. Most are a template with a sentiment word
  (``"The movie was wonderful."``); the probe reads the last token (the full stop), so it must read
  the sentiment from context, not from the token it sits on. A few dozen are hand-written sentences
  whose sentiment carries no single adjective (``"I want my money back."``).
* :func:`calendar` — days of the week or months of the year in templates that end on the name
  (``"The meeting is on Monday"``), labelled by the name, in cyclic order (for ``fit_circle``).
* :func:`day_in_context` — day-of-week arithmetic read at the last token, labelled with the day named.
* :func:`arithmetic_pairs`, :func:`capital_pairs`, :func:`sentiment_pairs` — contrast pairs for CCS:
  the same question answered "Yes" and "No" (or "positive"/"negative"), with whether "Yes" is right.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_POSITIVE = (
    "wonderful excellent delightful brilliant fantastic superb lovely charming beautiful great "
    "enjoyable marvellous outstanding pleasant heartwarming"
).split()
_NEGATIVE = (
    "terrible awful boring dreadful horrible dull disappointing painful bad tedious "
    "miserable unpleasant annoying pathetic dismal"
).split()
_REVIEW_TEMPLATES = (
    "The movie was {}.",
    "I thought the food was {}.",
    "Honestly, the book is {}.",
    "Our trip to the coast was {}.",
    "The service at this hotel was {}.",
    "That concert was absolutely {}.",
)
_POSITIVE_FREE = (
    "I would happily watch it again tomorrow.",
    "Everyone at the table was smiling by the end.",
    "We left the theatre humming the songs.",
    "It was worth every penny and more.",
    "I have already recommended it to all my friends.",
    "The staff went out of their way to help us.",
    "I could not put it down until the last page.",
    "We are definitely coming back next year.",
    "It made my whole week better.",
    "The kids asked to go again the very next day.",
    "Five stars, no hesitation at all.",
    "I laughed from beginning to end.",
)
_NEGATIVE_FREE = (
    "I want my money back.",
    "We walked out after twenty minutes.",
    "I fell asleep halfway through.",
    "Never again, not even if it were free.",
    "The waiter ignored us for an hour.",
    "I regret every minute I spent on it.",
    "The room smelled and the sheets were stained.",
    "I gave up on it after three chapters.",
    "It ruined what should have been a nice evening.",
    "Nobody in our group enjoyed a single moment.",
    "One star, and that is generous.",
    "I was checking my watch the whole time.",
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January February March April May June July August September October November December").split()
_DAY_TEMPLATES = (
    "The meeting is on {}",
    "I will see you on {}",
    "The shop is closed every {}",
    "My favourite day of the week is {}",
    "The package arrived last {}",
    "We always go swimming on {}",
    "Her birthday falls on a {}",
    "The deadline is next {}",
)
_MONTH_TEMPLATES = (
    "The festival takes place in {}",
    "She was born in {}",
    "The school year starts in {}",
    "We moved here last {}",
    "The report is due in {}",
    "My favourite month is {}",
    "The conference is held every {}",
    "They got married in {}",
)
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Canada": "Ottawa", "Poland": "Warsaw",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm",
    "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok", "China": "Beijing",
    "England": "London", "Hungary": "Budapest", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Turkey": "Ankara", "India": "New Delhi",
}  # fmt: skip


@dataclass(frozen=True)
class LabelledPrompts:
    """Prompts and one label each."""

    texts: list[str]
    labels: list
    classes: tuple = ()
    """The label values, in their natural (for calendars: cyclic) order."""
    val_indices: tuple[int, ...] = ()
    """A validation set chosen so a probe cannot pass by memorising (empty: split at random)."""


@dataclass(frozen=True)
class ContrastPairs:
    """CCS input: each question answered both ways, and whether the first answer is the true one."""

    pos: list[str]
    neg: list[str]
    labels: list[int]
    """1 if the ``pos`` text (answered "Yes" / "positive") is true."""


def sentiment() -> LabelledPrompts:
    """180 template reviews + 24 hand-written ones, labelled ``"positive"`` / ``"negative"``.

    ``val_indices`` holds out the last 3 sentiment words of each polarity (in every template) and all
    hand-written sentences: with a random split, every validation word would also be in training and
    any layer that keeps the word's identity would score 100%.
    """
    texts, labels, val = [], [], []
    for t in _REVIEW_TEMPLATES:
        for words, lab in ((_POSITIVE, "positive"), (_NEGATIVE, "negative")):
            for j, w in enumerate(words):
                if j >= len(words) - 3:
                    val.append(len(texts))
                texts.append(t.format(w))
                labels.append(lab)
    val += range(len(texts), len(texts) + len(_POSITIVE_FREE) + len(_NEGATIVE_FREE))
    texts += list(_POSITIVE_FREE) + list(_NEGATIVE_FREE)
    labels += ["positive"] * len(_POSITIVE_FREE) + ["negative"] * len(_NEGATIVE_FREE)
    return LabelledPrompts(texts, labels, ("negative", "positive"), tuple(val))


def calendar(kind: str = "days") -> LabelledPrompts:
    """Every day (``kind="days"``, 7 x 8 prompts) or month (``"months"``, 12 x 8) in every template."""
    if kind not in ("days", "months"):
        raise ValueError(f"kind must be 'days' or 'months', got {kind!r}")
    names, templates = (DAYS, _DAY_TEMPLATES) if kind == "days" else (MONTHS, _MONTH_TEMPLATES)
    texts = [t.format(n) for t in templates for n in names]
    labels = [n for _ in templates for n in names]
    return LabelledPrompts(texts, labels, tuple(names))


_DAY_CONTEXT_TEMPLATES = (
    "Today is {}, so tomorrow is",
    "If today is {}, then tomorrow will be",
    "Yesterday was {}, so today is",
    "The day after {} is",
    "Today is {}, so yesterday was",
    "The day before {} is",
    "Two days after {} comes",
    "The shop opens on {}, and closes the next day, on",
)


def day_in_context() -> LabelledPrompts:
    """Day-of-week arithmetic prompts (``"Today is Monday, so tomorrow is"``), labelled with the day
    *named* in the prompt, read at the last token — never a day name itself.

    A probe can only decode the label where some layer has moved the day to the position that must
    compute the answer. ``val_indices`` holds out two whole templates, so the probe must read the day
    the same way across wordings rather than memorise (template, day) pairs.
    """
    texts, labels, val = [], [], []
    for k, template in enumerate(_DAY_CONTEXT_TEMPLATES):
        for day in DAYS:
            if k >= len(_DAY_CONTEXT_TEMPLATES) - 2:
                val.append(len(texts))
            texts.append(template.format(day))
            labels.append(day)
    return LabelledPrompts(texts, labels, DAYS, tuple(val))


def arithmetic_pairs(n: int = 120, seed: int = 0) -> ContrastPairs:
    """``"Question: Is 12 + 7 = 19? Answer: Yes"`` / ``"... No"``; half the sums are off by 1 to 5."""
    rng = random.Random(seed)
    pos, neg, labels = [], [], []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        true = i % 2 == 0
        c = a + b if true else a + b + rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5])
        q = f"Question: Is {a} + {b} = {c}? Answer:"
        pos.append(q + " Yes")
        neg.append(q + " No")
        labels.append(int(true))
    return ContrastPairs(pos, neg, labels)


def capital_pairs(seed: int = 0) -> ContrastPairs:
    """Each country with its capital (true) and with another country's capital (false)."""
    rng = random.Random(seed)
    countries = list(_CAPITALS)
    pos, neg, labels = [], [], []
    for country in countries:
        wrong = _CAPITALS[rng.choice([c for c in countries if c != country])]
        for city, true in ((_CAPITALS[country], 1), (wrong, 0)):
            q = f"Question: Is the capital of {country} {city}? Answer:"
            pos.append(q + " Yes")
            neg.append(q + " No")
            labels.append(true)
    return ContrastPairs(pos, neg, labels)


def sentiment_pairs() -> ContrastPairs:
    """Burns et al.'s review format: ``"<review> Question: Is this review positive? Answer: Yes"``."""
    data = sentiment()
    q = " Question: Is this review positive? Answer:"
    return ContrastPairs(
        [t + q + " Yes" for t in data.texts],
        [t + q + " No" for t in data.texts],
        [int(lab == "positive") for lab in data.labels],
    )


# The registries the CLI's --dataset choices are read from (never a hand-kept list).
LABELLED = {
    "sentiment": sentiment,
    "days": lambda: calendar("days"),
    "months": lambda: calendar("months"),
    "day-in-context": day_in_context,
}
PAIRS = {"sentiment": sentiment_pairs, "capitals": capital_pairs, "arithmetic": arithmetic_pairs}
