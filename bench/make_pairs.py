"""Generate minimal pairs in BLiMP's format from templates and a small lexicon.

These pairs are GENERATED here, not BLiMP (Warstadt et al. 2020): a handful of agreement
paradigms in BLiMP's jsonl layout (sentence_good, sentence_bad, UID, linguistics_term, field,
pairID), for trying `lmtk eval RUN suite=pairs pairs.path=DIR` offline. Real BLiMP:
`pairs.hf=true` (nyu-mll/blimp on the Hugging Face hub).

    python bench/make_pairs.py OUT_DIR [--n 200] [--seed 0]

One file per paradigm, OUT_DIR/<UID>.jsonl; the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NOUNS = [  # (singular, plural)
    ("dog", "dogs"), ("teacher", "teachers"), ("child", "children"), ("doctor", "doctors"), ("cat", "cats"),
    ("student", "students"), ("woman", "women"), ("man", "men"), ("bird", "birds"), ("writer", "writers"),
    ("player", "players"), ("farmer", "farmers"),
]
OBJECTS = [("book", "books"), ("car", "cars"), ("house", "houses"), ("apple", "apples"), ("song", "songs"),
           ("picture", "pictures"), ("letter", "letters"), ("chair", "chairs")]
VERBS = [  # (3rd singular present, plural present) of transitive verbs
    ("likes", "like"), ("sees", "see"), ("finds", "find"), ("wants", "want"), ("needs", "need"), ("buys", "buy"),
    ("carries", "carry"), ("draws", "draw"),
]
INTRANSITIVE = [("sleeps", "sleep"), ("runs", "run"), ("laughs", "laugh"), ("waits", "wait"), ("sings", "sing")]
REFLEXIVE_VERBS = ["saw", "hurt", "helped", "praised", "described", "blamed"]
NAMES_M = ["John", "Peter", "David", "Mark"]


def _pick(rng, xs):
    return xs[rng.randrange(len(xs))]


def subject_verb_agreement(rng):
    (s, p), (vs, vp), (o, _) = _pick(rng, NOUNS), _pick(rng, VERBS), _pick(rng, OBJECTS)
    if rng.random() < 0.5:
        return f"The {s} {vs} the {o}.", f"The {s} {vp} the {o}."
    return f"The {p} {vp} the {o}.", f"The {p} {vs} the {o}."


def agreement_across_prepositional_phrase(rng):
    (s, p), (ds, dp), (vs, vp) = _pick(rng, NOUNS), _pick(rng, OBJECTS), _pick(rng, INTRANSITIVE)
    if rng.random() < 0.5:  # singular head, plural distractor
        return f"The {s} near the {dp} {vs}.", f"The {s} near the {dp} {vp}."
    return f"The {p} near the {ds} {vp}.", f"The {p} near the {ds} {vs}."


def determiner_noun_agreement(rng):
    (s, p), vs = _pick(rng, OBJECTS), _pick(rng, ["saw", "found", "bought", "liked"])
    who = _pick(rng, NAMES_M)
    if rng.random() < 0.5:
        det_good, det_bad = _pick(rng, [("this", "these"), ("that", "those")])
        return f"{who} {vs} {det_good} {s}.", f"{who} {vs} {det_bad} {s}."
    det_good, det_bad = _pick(rng, [("these", "this"), ("those", "that")])
    return f"{who} {vs} {det_good} {p}.", f"{who} {vs} {det_bad} {p}."


def anaphor_number_agreement(rng):
    (s, p), v = _pick(rng, NOUNS), _pick(rng, REFLEXIVE_VERBS)
    if rng.random() < 0.5:
        refl = "herself" if s in ("woman",) else "himself"
        return f"The {s} {v} {refl}.", f"The {s} {v} themselves."
    return f"The {p} {v} themselves.", f"The {p} {v} {_pick(rng, ['himself', 'herself'])}."


def existential_there_agreement(rng):
    (s, p) = _pick(rng, OBJECTS)
    place = _pick(rng, ["in the room", "on the table", "near the door", "in the garden"])
    if rng.random() < 0.5:
        return f"There is a {s} {place}.", f"There are a {s} {place}."
    return f"There are many {p} {place}.", f"There is many {p} {place}."


PARADIGMS = {  # UID -> (generator, linguistics_term, field)
    "gen_subject_verb_agreement": (subject_verb_agreement, "subject_verb_agreement", "morphology"),
    "gen_agreement_across_pp": (agreement_across_prepositional_phrase, "subject_verb_agreement", "morphology"),
    "gen_determiner_noun_agreement": (determiner_noun_agreement, "determiner_noun_agreement", "morphology"),
    "gen_anaphor_number_agreement": (anaphor_number_agreement, "anaphor_agreement", "morphology"),
    "gen_existential_there_agreement": (existential_there_agreement, "subject_verb_agreement", "syntax"),
}


def generate(out: Path, n: int = 200, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (uid, (gen, term, field)) in enumerate(PARADIGMS.items()):
        rng = random.Random(seed * 1000 + k)
        seen, rows = set(), []
        for _ in range(n * 20):  # distinct pairs; small lexicons run out before n for some paradigms
            good, bad = gen(rng)
            if good in seen:
                continue
            seen.add(good)
            rows.append({"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term,
                         "UID": uid, "pairID": str(len(rows))})
            if len(rows) == n:
                break
        path = out / f"{uid}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=200, help="pairs per paradigm (at most; small lexicons give fewer)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for p in generate(a.out, a.n, a.seed):
        print(f"{p}: {sum(1 for _ in p.open())} pairs")


if __name__ == "__main__":
    main()
