"""The embedded demo's synthetic preference set, and the grader for its answers.

Each row is one short task with an exact answer::

    {"id", "family", "prompt", "chosen", "rejected", "answer"}

``prompt`` is the user message, ``chosen`` the correct reply (equal to ``answer``) and
``rejected`` a plausible mistake: an off-by-one or off-by-ten result, a wrong unit factor, the
other number of a comparison, or the right content in the wrong format. Every prompt states its
output format, and replies are a few tokens long so that CPU training stays fast.

``generate`` is deterministic for a seed. Every family draws from its own
``random.Random(f"{seed}:{family}")``, eval items first, so the eval set does not depend on
``num_train``. Items are deduplicated on a content key (``37 + 48`` and ``48 + 37`` share one),
which keeps every eval item unseen in train.
"""

import random

FAMILIES: tuple[str, ...] = ("arithmetic", "units", "compare", "format", "sequence", "rounding")

# Short, common nouns for the format family.
_WORDS: tuple[str, ...] = tuple(
    (
        "apple river stone cloud garden window candle forest bridge mirror pencil rocket island "
        "basket castle ladder orange planet silver tiger jacket marble button dragon engine falcon "
        "guitar hammer kettle lemon meadow needle parrot pillow rabbit saddle tunnel violin wallet "
        "yellow anchor bottle carpet desert feather glove harbor jungle lantern monkey ocean pepper "
        "puzzle ribbon shadow spider teapot tomato valley wizard bread chair horse music paper sugar "
        "table water house light"
    ).split()
)
# (from, to, factor): decimal factors, so the right answer is a digit pattern.
_UNITS: tuple[tuple[str, str, int], ...] = (
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("kilobytes", "bytes", 1000),
)
_NUMBER = "Reply with only the number."


def generate(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return ``(train, eval)`` rows, balanced across ``FAMILIES`` and disjoint by content.

    rows: {"id": str, "family": str, "prompt": str, "chosen": str, "rejected": str, "answer": str}
    Per-family counts differ by at most one; each family holds at least 500 distinct items.
    Raises ValueError on negative counts, or when a family has too few items for the request.
    """
    if num_train < 0:
        raise ValueError(f"num_train must be >= 0, got {num_train}")
    if num_eval < 0:
        raise ValueError(f"num_eval must be >= 0, got {num_eval}")
    train_counts = _spread(num_train, len(FAMILIES))
    eval_counts = _spread(num_eval, len(FAMILIES))
    train: list[dict] = []
    evals: list[dict] = []
    for family, n_train, n_eval in zip(FAMILIES, train_counts, eval_counts, strict=True):
        rows = _draw_unique(family, n_eval + n_train, random.Random(f"{seed}:{family}"))
        evals += [dict(row, id=f"{family}-eval-{i:05d}") for i, row in enumerate(rows[:n_eval])]
        train += [dict(row, id=f"{family}-train-{i:05d}") for i, row in enumerate(rows[n_eval:])]
    random.Random(f"{seed}:train-order").shuffle(train)
    random.Random(f"{seed}:eval-order").shuffle(evals)
    return train, evals


# A short, neutral system turn: without one, SmolLM2's template inserts its default system prompt, which
# costs ~20 tokens per sequence (a third of a demo pair's compute) and says nothing about the tasks.
SYSTEM_PROMPT = "You are a helpful assistant."


def prompt_messages(row: dict) -> list[dict[str, str]]:
    """The chat prompt of a row: the system turn and the task as the user turn."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["prompt"]}]


def check(row: dict, completion: str) -> bool:
    """True when the model's generated completion (text after the assistant header, special tokens stripped) answers row correctly.

    Strict to the stated format: after stripping whitespace and one trailing period the completion
    must equal ``row["answer"]`` exactly (case included), so ``"The answer is 85."`` is wrong.
    """
    text = completion.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text == row["answer"]


def _spread(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` counts that differ by at most one, larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _draw_unique(family: str, count: int, rng: random.Random) -> list[dict]:
    """Draw ``count`` rows of ``family`` with distinct content keys, in draw order."""
    seen: set[tuple] = set()
    rows: list[dict] = []
    misses = 0
    while len(rows) < count:
        key, row = _make(family, rng)
        if key in seen:
            # A long run of repeats means the family is (nearly) exhausted.
            misses += 1
            if misses > 2000:
                raise ValueError(f"family {family!r} has fewer than {count} distinct items")
            continue
        misses = 0
        seen.add(key)
        rows.append(row)
    return rows


def _make(family: str, rng: random.Random) -> tuple[tuple, dict]:
    """One ``(content key, row without id)`` of ``family``."""
    if family == "arithmetic":
        return _arithmetic(rng)
    if family == "units":
        return _units(rng)
    if family == "compare":
        return _compare(rng)
    if family == "format":
        return _format(rng)
    if family == "sequence":
        return _sequence(rng)
    if family == "rounding":
        return _rounding(rng)
    raise ValueError(f"unknown family {family!r}; allowed: {FAMILIES}")


def _row(family: str, prompt: str, answer: str, rejected: str) -> dict:
    """A row whose chosen reply is the answer itself."""
    assert rejected != answer, (prompt, answer)
    return {"family": family, "prompt": prompt, "chosen": answer, "rejected": rejected, "answer": answer}


def _wordy(answer: str) -> str:
    """The right answer wrapped in a sentence: the format instruction ignored."""
    return f"The answer is {answer}."


def _arithmetic(rng: random.Random) -> tuple[tuple, dict]:
    """Two-digit addition or subtraction; rejected is off by one or ten, or wordy."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        key, prompt, value = ("+", min(a, b), max(a, b)), f"What is {a} + {b}? {_NUMBER}", a + b
    else:
        a, b = max(a, b), min(a, b)
        key, prompt, value = ("-", a, b), f"What is {a} - {b}? {_NUMBER}", a - b
    kind = rng.choice(("one", "ten", "wordy"))
    if kind == "wordy":
        rejected = _wordy(str(value))
    else:
        step = 1 if kind == "one" else 10
        rejected = str(value + step if rng.random() < 0.5 or value < step else value - step)
    return key, _row("arithmetic", prompt, str(value), rejected)


def _units(rng: random.Random) -> tuple[tuple, dict]:
    """Convert a whole number to a smaller unit; rejected uses a factor ten off, or is wordy."""
    src, dst, factor = rng.choice(_UNITS)
    n = rng.randint(2, 99)
    value = n * factor
    prompt = f"Convert {n} {src} to {dst}. {_NUMBER}"
    kind = rng.choice(("small", "big", "wordy"))
    if kind == "wordy":
        rejected = f"{value} {dst}"
    else:
        rejected = str(value // 10 if kind == "small" else value * 10)
    return (src, n), _row("units", prompt, str(value), rejected)


def _compare(rng: random.Random) -> tuple[tuple, dict]:
    """Pick the larger or smaller of two numbers; rejected picks the other, or is wordy."""
    a, b = rng.sample(range(10, 1000), 2)
    which = rng.choice(("larger", "smaller"))
    value, other = (max(a, b), min(a, b)) if which == "larger" else (min(a, b), max(a, b))
    prompt = f"Which number is {which}, {a} or {b}? {_NUMBER}"
    rejected = _wordy(str(value)) if rng.random() < 0.25 else str(other)
    return (which, min(a, b), max(a, b)), _row("compare", prompt, str(value), rejected)


def _format(rng: random.Random) -> tuple[tuple, dict]:
    """Rewrite words as told (hyphen-join or capitals); rejected ignores the instruction."""
    if rng.random() < 0.5:
        word = rng.choice(_WORDS)
        prompt = f"Write the word {word} in capital letters. Reply with only the word."
        rejected = rng.choice((word, word.capitalize(), f"The word is {word.upper()}."))
        return ("upper", word), _row("format", prompt, word.upper(), rejected)
    a, b = rng.sample(_WORDS, 2)
    prompt = f"Join the words {a} and {b} with a hyphen. Reply with only the joined words."
    rejected = rng.choice((f"{a} {b}", f"{a}{b}", f"{a}_{b}", f"The joined words are {a}-{b}."))
    return ("hyphen", a, b), _row("format", prompt, f"{a}-{b}", rejected)


def _sequence(rng: random.Random) -> tuple[tuple, dict]:
    """Next term of an arithmetic progression; rejected is off by one, the last term, or wordy."""
    start, step = rng.randint(1, 50), rng.randint(2, 12)
    terms = [start + i * step for i in range(4)]
    value = terms[-1] + step
    prompt = f"What number comes next: {', '.join(map(str, terms))}? {_NUMBER}"
    kind = rng.choice(("one", "last", "wordy"))
    if kind == "wordy":
        rejected = _wordy(str(value))
    else:
        rejected = str(terms[-1] if kind == "last" else value + rng.choice((-1, 1)))
    return (start, step), _row("sequence", prompt, str(value), rejected)


def _rounding(rng: random.Random) -> tuple[tuple, dict]:
    """Round to the nearest ten; rejected rounds the wrong way, to the hundred, or is wordy."""
    n = 10 * rng.randint(10, 99) + rng.choice((1, 2, 3, 4, 6, 7, 8, 9))  # no ties to break
    value = (n + 5) // 10 * 10
    prompt = f"Round {n} to the nearest ten. {_NUMBER}"
    kind = rng.choice(("wrong_way", "hundred", "wordy"))
    if kind == "wordy":
        rejected = _wordy(str(value))
    elif kind == "hundred" and (n + 50) // 100 * 100 != value:
        rejected = str((n + 50) // 100 * 100)
    else:
        rejected = str(value - 10 if value > n else value + 10)
    return (n,), _row("rounding", prompt, str(value), rejected)
