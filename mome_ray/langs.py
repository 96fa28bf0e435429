"""Languages: the one type for a language code, and the stop-word lists of the line-level language vote.

Languages are configuration. A natural language needs a stop-word list (built in below for common ones, or
given in the config as `corpus.stopwords.<code>`); a programming language is listed in
`corpus.code_langs` and skips the vote. Adding Spanish is a config line plus a source, not an edit here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mome_ray.errors import MomeError

# The most frequent function words of each language: short, closed-class, rarely shared across languages.
STOPWORDS: dict[str, str] = {
    "en": "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if can will do its what "
    "these than them may should must into more your our also only such how other",
    "fr": "le la les des est une un et du que qui dans pour pas sur au avec ce il elle sont par plus ne se "
    "ou son sa ses aux cette mais ont nous vous leur été être fait comme peut tout ces même dont où "
    "aussi lui entre si sans très avoir ainsi",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an "
    "werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war "
    "haben nur oder aber vor zur bis mehr durch kann wenn sein ihre können diese dieser",
    "es": "el la de que y en los se del las un por con no una su para es al lo como más pero sus le ha "
    "me si sin sobre este ya entre cuando todo esta ser son dos también fue había era muy hasta desde",
    "it": "il di che e la per un in non una sono del della le si da con al dei gli ha mi nel alla anche "
    "come ma più lo questo se ci delle nella essere sul ancora dove tutto quando fra hanno",
    "nl": "de het een en van in is dat op te zijn met voor niet aan er ook als bij door maar om dan wordt "
    "nog uit naar kan zo deze hij ze wel worden tot hebben heeft was waren",
    "pt": "de que o a do da em um para com não uma os no se na por mais as dos como mas ao ele das seu sua "
    "ou quando muito nos já também só pelo pela até isso ela entre depois sem mesmo aos",
}


@dataclass(frozen=True)
class Lang:
    """A language of the corpus: its code and, for natural languages, its stop words."""

    code: str
    is_code: bool  # a programming language: no stop-word vote
    stopwords: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.code


def resolve_langs(codes: list[str], code_langs: list[str], extra_stopwords: dict[str, list[str]]) -> list[Lang]:
    """Turn config codes into `Lang`s; an unknown natural language is an error that says how to add it."""
    if not codes:
        raise MomeError("config 'langs' is empty; list at least one language code, e.g. langs=[en,fr]")
    if len(set(codes)) != len(codes):
        raise MomeError(f"config 'langs' has duplicates: {codes}")
    out = []
    for code in codes:
        if code in code_langs:
            out.append(Lang(code, True))
        elif code in extra_stopwords or code in STOPWORDS:
            words = extra_stopwords.get(code) or STOPWORDS[code].split()
            out.append(Lang(code, False, frozenset(w.lower() for w in words)))
        else:
            raise MomeError(
                f"unknown language '{code}': no stop-word list for it. Add 'corpus.stopwords.{code}: [...]' "
                f"to the config (the language's most frequent function words), or list it in corpus.code_langs "
                f"if it is a programming language. Built in: {', '.join(sorted(STOPWORDS))}"
            )
    return out


def vote_lists(langs: list[Lang]) -> dict[str, frozenset[str]]:
    """Stop-word lists that take part in the vote: every built-in one plus the run's own languages.

    Built-in languages vote even when not trained on, so an untranslated English line in a French
    package is recognised as English and dropped.
    """
    lists = {code: frozenset(words.split()) for code, words in STOPWORDS.items()}
    lists.update({lang.code: lang.stopwords for lang in langs if not lang.is_code})
    return lists
