"""Prose that reads like an answer: deterministic, of an exact length, on the prompt's topic.

Why: the local responder's answers feed tests (exact word counts, token usage, truncation
at maxOutputTokens) and demos (text a person can glance at). Sentences are built from
templates with a seeded RNG, some nouns taken from the prompt; long answers reuse a pool of
sentences, so a million-word answer costs milliseconds, not seconds.
"""

from __future__ import annotations

import random

from gembatch.emulator.directives import strip_directives

_DETERMINERS = ("the", "this", "each", "every", "that", "one", "the", "the")
_ADJECTIVES = (
    "clear", "simple", "practical", "careful", "common", "useful", "small", "large", "modern",
    "reliable", "flexible", "steady", "gradual", "direct", "broad", "specific", "local",
    "general", "typical", "important", "efficient", "consistent", "basic", "complex",
    "robust", "natural", "careful", "early", "final", "central", "overall", "main",
)  # fmt: skip
_NOUNS = (
    "approach", "answer", "system", "process", "result", "method", "example", "question",
    "detail", "factor", "pattern", "context", "option", "change", "step", "goal", "source",
    "effect", "value", "idea", "model", "structure", "balance", "choice", "outcome", "record",
    "design", "plan", "review", "response", "reason", "feature", "measure", "limit",
    "benefit", "risk", "task", "tool", "point", "view", "trend", "rule", "case", "level",
    "range", "signal", "method", "practice", "summary", "principle",
)  # fmt: skip
_VERBS = (
    "shapes", "supports", "explains", "improves", "reflects", "requires", "affects",
    "highlights", "shows", "suggests", "reduces", "extends", "connects", "defines",
    "follows", "balances", "reveals", "guides", "limits", "covers", "describes", "informs",
    "strengthens", "clarifies", "changes", "involves", "includes", "favours",
)  # fmt: skip
_ADVERBS = (
    "often", "usually", "clearly", "gradually", "directly", "largely", "mostly", "rarely",
    "generally", "typically", "quietly", "steadily",
)  # fmt: skip
_PREPOSITIONS = ("in", "for", "with", "across", "within", "through", "beyond", "around", "under")
_CONNECTORS = (
    "However,", "Typically,", "Moreover,", "Overall,", "Notably,", "Meanwhile,", "Similarly,",
    "Ultimately,", "Often,", "Still,", "Therefore,", "Also,",
)  # fmt: skip
# Slots: D determiner, A adjective, N noun (sometimes a prompt word), V verb, R adverb,
# P preposition, C connector; "," glues a comma to the previous word.
_TEMPLATES = (
    "D A N V D N P D N",
    "C D N V D A N",
    "D A N R V D N P D A N",
    "N V D A N",
    "C D N P D N V D A N",
    "D N V D N , and D N R V D A N",
    "D A N V D N",
    "R , D N V D A N P D N",
)
_TEMPLATE_SLOTS = tuple(tuple(t.split()) for t in _TEMPLATES)
_LONGEST_TEMPLATE = max(len([s for s in t if s != ","]) for t in _TEMPLATE_SLOTS)
_SLOT_WORDS = {
    "D": _DETERMINERS,
    "A": _ADJECTIVES,
    "N": _NOUNS,
    "V": _VERBS,
    "R": _ADVERBS,
    "P": _PREPOSITIONS,
    "C": _CONNECTORS,
}
_RESTATEMENTS = ('Regarding "{q}":', 'You asked: "{q}".', 'On "{q}":', 'To answer "{q}":')
# Long answers reuse a pool of this many sentences: one RNG call per word would make a
# million-word answer take seconds.
_SENTENCE_POOL = 256
_PARAGRAPH = 5


# Sentences of an exact short length, to end an answer on a whole sentence.
_SHORT_SENTENCES = (
    ("Indeed.", "Certainly.", "Exactly."),
    ("Results vary.", "Context matters.", "Details differ."),
    ("This helps overall.", "Context matters here.", "That seems reasonable."),
    ("The approach works well.", "Each case differs slightly.", "This point matters most."),
)
_ADJECTIVE_ENDINGS = ("ly", "ous", "ful", "ive", "able", "ible", "ant", "ing", "ed", "less")


def _noun_like(words: list[str]) -> list[str]:
    """Prompt words that can stand in a noun slot without reading oddly."""
    return [w for w in words if not w.lower().endswith(_ADJECTIVE_ENDINGS)]


def _capitalised(words: list[str]) -> str:
    words[0] = words[0][:1].upper() + words[0][1:]
    words[-1] = words[-1].rstrip(",") + "."
    return " ".join(words)


def _exact_sentence(rng: random.Random, n: int, topic: list[str]) -> str:
    """A sentence of exactly `n` words."""
    if n <= len(_SHORT_SENTENCES):
        return rng.choice(_SHORT_SENTENCES[n - 1])

    def noun() -> str:
        return rng.choice(topic) if topic and rng.random() < 0.3 else rng.choice(_NOUNS)

    phrases = [[rng.choice(_DETERMINERS), noun()], [rng.choice(_VERBS)]]
    phrases.append([rng.choice(_DETERMINERS), noun()])
    extra = n - 5
    while extra >= 3:
        phrases.append([rng.choice(_PREPOSITIONS), rng.choice(_DETERMINERS), noun()])
        extra -= 3
    for phrase in rng.sample([p for p in phrases if len(p) > 1], k=extra):
        phrase.insert(-1, rng.choice(_ADJECTIVES))
    return _capitalised([word for phrase in phrases for word in phrase])


def _sentence(rng: random.Random, topic: list[str]) -> tuple[str, int]:
    words: list[str] = []
    for slot in rng.choice(_TEMPLATE_SLOTS):
        if slot == ",":
            words[-1] += ","
        elif slot == "and":
            words.append("and")
        elif slot == "N" and topic and rng.random() < 0.3:
            words.append(rng.choice(topic))
        else:
            words.append(rng.choice(_SLOT_WORDS[slot]))
    return _capitalised(words), len(words)


def prose(rng: random.Random, n_words: int, prefix: str, topic: list[str]) -> str:
    """Exactly `n_words` words: `prefix`, then sentences in paragraphs."""
    prefix_words = prefix.split()
    if n_words <= len(prefix_words):
        return " ".join(prefix_words[:n_words])
    need = n_words - len(prefix_words)
    topic = _noun_like(topic)
    sentences: list[str] = []
    pool: list[tuple[str, int]] = []
    total = 0
    # Stop short of the target; _exact_sentence then lands on it with a whole sentence.
    room = need - _LONGEST_TEMPLATE
    while total < room and len(pool) < _SENTENCE_POOL:
        sentence, count = _sentence(rng, topic)
        pool.append((sentence, count))
        sentences.append(sentence)
        total += count
    while total < room:
        average = max(1, total // len(sentences))
        for sentence, count in rng.choices(pool, k=max(1, (room - total) // average)):
            sentences.append(sentence)
            total += count
            if total >= room:
                break
    while total < need:
        sentence, count = _sentence(rng, topic)
        if count > need - total:
            sentence, count = _exact_sentence(rng, need - total, topic), need - total
        sentences.append(sentence)
        total += count
    paragraphs = [
        " ".join(sentences[i : i + _PARAGRAPH]) for i in range(0, len(sentences), _PARAGRAPH)
    ]
    body = "\n\n".join(paragraphs)
    return f"{' '.join(prefix_words)} {body}" if prefix_words else body


def restatement(rng: random.Random, question: str) -> str:
    words = strip_directives(question).split()
    if not words:
        return ""
    quoted = " ".join(words[:12]) + ("..." if len(words) > 12 else "")
    return rng.choice(_RESTATEMENTS).format(q=quoted)
