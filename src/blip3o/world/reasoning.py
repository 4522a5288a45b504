"""Spelled-out answers: a relation reply that writes its steps before its yes / no, and how the final answer of
any reply is read.

Given where two objects are, the yes / no of "is the red cross right of the purple circle?" is an XOR of the
asked direction and the objects' order on that axis, which gives gradient descent no first-order signal: the
miniature's 4-layer language model stays at chance on it, with text or image tokens, plain or with first-order
twin questions beside it (docs/bench/understanding_position_trials.txt, sessions 45-48). Written out, each step
is one it learns: where each object is (in thirds, as the captions and where-questions say it), the relation
that holds on the asked axis (one comparison), then the answer (a match of two words):

    "red cross bottom left, purple circle middle centre, red cross left of purple circle, so no"

Session 48: trained on such replies to relation questions alone, on fixed object-centric tokens (the target a
vision stage with `StageConfig.scene_embedding_weight` regresses), ShapesVQA's 300 relation questions were
answered 0.953 (both places right 300 / 300, final word follows the written step 300 / 300).

The answer a benchmark scores is the reply's last part, after `ANSWER_MARKER` (`final_answer`): a plain
one-word reply is its own final answer, so models trained without steps are read exactly as before.
"""

from __future__ import annotations

from .language import (
    named_object,
    object_location,
    relation_on_axis,
    relation_phrase,
    relation_question_parts,
)
from .scene import Scene, relations_between

ANSWER_MARKER = ", so "  # steps, then ", so ", then the answer
RELATION_FORMS = (
    "truth",
    "compare",
    "canonical",
)  # the recipe's spelled-out forms (StageConfig.relation_form)
_TURNED = {
    "below": "above",
    "right of": "left of",
}  # "A below B" is "B above A": the canonical form's way round


def final_answer(reply: str) -> str:
    """The answer of a reply: what follows its last ", so " (a reply without steps is its own answer)."""
    return reply.rsplit(ANSWER_MARKER, 1)[-1]


def relation_questions(qa: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The relation questions among (question, answer) pairs, in their order."""
    return [(q, a) for q, a in qa if relation_question_parts(q) is not None]


def relation_steps(
    question: str,
    answer: str,
    scene: Scene,
    holds: bool = False,
    truth: bool = False,
    compare: bool = False,
    canonical: bool = False,
) -> str:
    """A relation answer with its steps written out; any other question keeps its answer.

    "is the red circle left of the blue star?" -> "red circle top left, blue star middle right, so yes": the
    place (thirds) of each named object. The thirds decide 0.947 of ShapesVQA's relation answers
    (bench/relation_ceiling.py), so the places alone cap relations there.

    truth: also write the relation that holds on the asked axis, "red circle left of blue star" ("level with"
    where neither holds; `relation_on_axis`). First-order given the places; the final word is then whether
    it is the asked relation. The recipe's form (`StageConfig.relation_steps`).

    holds: also write every relation that holds ("red circle above and left of blue star"; "by" where none
    does), as the captions' relation sentences do. Measured worse: the match of the asked relation against
    that list stopped at 0.770 in text (bench/relation_text.py --task holds_listed).

    compare: with truth, also write the asked relation again just before the answer ("..., red circle right of
    blue star, asked left of, so no"), so the final yes / no compares two nearby words instead of reaching back
    into the question for the asked one (session 50: the truth form's last step said "yes" to the opposite
    relation in every recipe run). Recipe, 2 seeds: the last step learned in one (300 / 300), not in the other.

    canonical: with truth, ask the question the way round whose relation is "above" or "left of": "is A below B?"
    is "is B above A?" (GenEval's rule is symmetric), so the steps name B first, then A, then the relation that
    holds for B against A on that axis: "blue star middle right, red circle top left, blue star below red circle,
    so no". The final word is then "yes" exactly where the written relation is "above" or "left of", a function of
    one written word (first-order), where the other forms need it compared with the asked one (an XOR); the choice
    of which object to name first is learned as a copy the supervision spells out. Recipe, 2 seeds: the final word
    follows the written relation in 300 / 300 replies of both (shapes-object-v2 uses this form)."""
    parts = relation_question_parts(question)
    if parts is None:
        return answer
    colour_a, shape_a, asked, colour_b, shape_b = parts
    if canonical and (not truth or compare or holds):
        raise ValueError("canonical is a form of the truth step alone: give truth=True, not compare or holds")
    if canonical and asked in _TURNED:
        colour_a, shape_a, colour_b, shape_b, asked = colour_b, shape_b, colour_a, shape_a, _TURNED[asked]
    a, b = named_object(scene, colour_a, shape_a), named_object(scene, colour_b, shape_b)
    name_a, name_b = f"{colour_a} {shape_a}", f"{colour_b} {shape_b}"
    steps = [
        f"{name_a} {' '.join(object_location(a, scene.size))}",
        f"{name_b} {' '.join(object_location(b, scene.size))}",
    ]
    if holds:
        steps.append(f"{name_a} {relation_phrase(relations_between(a.box, b.box)) or 'by'} {name_b}")
    if truth:
        steps.append(f"{name_a} {relation_on_axis(asked, relations_between(a.box, b.box))} {name_b}")
    if compare:
        if not truth:
            raise ValueError(
                "compare writes the asked relation beside the one that holds: it needs truth=True"
            )
        steps.append(f"asked {asked}")
    return f"{', '.join(steps)}{ANSWER_MARKER}{answer}"


def spelled_relation(question: str, answer: str, scene: Scene, form: str = "truth") -> str:
    """`relation_steps` in one of the recipe's forms (`RELATION_FORMS`): the axis truth, plus the asked relation
    again ("compare"), or asked the way round whose relation is "above" / "left of" ("canonical")."""
    if form not in RELATION_FORMS:
        raise ValueError(f"unknown relation form {form!r}; known: {', '.join(RELATION_FORMS)}")
    return relation_steps(
        question, answer, scene, truth=True, compare=form == "compare", canonical=form == "canonical"
    )
