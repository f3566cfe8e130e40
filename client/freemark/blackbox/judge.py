"""Judging a Responder against an output key: one query set asked, three statistics read.

`extract_outputs` asks the responder one set's queries and, for a score responder, the set's
ranking items, then judges the answers (`judge_answers`) against the null the panel's answers
give (`freemark.verdict.outputs`): the labels test always, the score and ranking tests where
the responder returns scores (combined under the decision's Bonferroni correction). Here the
panel's answers are the ones the owner measured at derivation and keeps in his key; a key
server measures its own and calls `judge_answers` with them.
"""

from __future__ import annotations

import numpy as np

from freemark.blackbox.key import OutputKey
from freemark.blackbox.responder import Answers, Responder, read_answers
from freemark.errors import InvalidInputError
from freemark.records.types import Verdict
from freemark.verdict.decision import DEFAULT_ALPHA
from freemark.verdict.outputs import (
    OutputTest,
    decide_outputs,
    label_successes,
    output_test,
    ranking_successes,
    score_successes,
)

__all__ = ["check_host_answers", "extract_outputs", "judge_answers", "output_tests", "set_items"]


def set_items(key: OutputKey, set_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, ranking item indices) of one set."""
    if not 0 <= set_id < key.n_sets:
        raise InvalidInputError(f"the key holds sets 0..{key.n_sets - 1}, not {set_id}")
    return np.flatnonzero(key.set_ids == set_id), np.flatnonzero(key.ranking_set_ids == set_id)


def _items(key: OutputKey, set_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, ranking item indices) of one set, or of every set (`None`)."""
    if set_id is None:
        return np.arange(len(key.queries)), np.arange(len(key.ranking_inputs))
    return set_items(key, set_id)


def output_tests(key: OutputKey, set_id: int | None, answers: Answers, ranking: Answers | None,
                 *, panel_query_scores: np.ndarray, panel_ranking_scores: np.ndarray
                 ) -> list[OutputTest]:
    """The output tests of a suspect's answers to set `set_id` (`None`: every set, as for a
    model file judged in a sandbox, where nothing is disclosed), against a panel's scores
    (members, items, classes) on the whole key's queries and ranking items: labels always,
    scores and ranking where the answers carry scores. Each is a `decision.Test`, so it
    joins a white-box verdict as any further test does."""
    q, r = _items(key, set_id)
    targets, others = key.targets[q], key.others[q]
    folds, member_folds = key.folds[q], key.panel_folds
    panel_q = panel_query_scores[:, q]
    tests: list[OutputTest] = [output_test(
        "labels", label_successes(answers.labels, targets),
        label_successes(panel_q.argmax(axis=2), targets[None, :]), folds, member_folds)]
    if answers.scores is not None:
        tests.append(output_test("scores", score_successes(answers.scores, targets, others),
                                 score_successes(panel_q, targets, others), folds, member_folds))
    if ranking is not None and ranking.scores is not None and len(r):
        orders = key.ranking_orders[r]
        tests.append(output_test("ranking", ranking_successes(ranking.scores, orders),
                                 ranking_successes(panel_ranking_scores[:, r], orders),
                                 key.ranking_folds[r], member_folds))
    return tests


def judge_answers(key: OutputKey, set_id: int | None, answers: Answers, ranking: Answers | None,
                  *, panel_query_scores: np.ndarray, panel_ranking_scores: np.ndarray,
                  alpha: float = DEFAULT_ALPHA) -> Verdict:
    """The verdict of an output key alone on a suspect's answers (`output_tests`)."""
    return decide_outputs(output_tests(key, set_id, answers, ranking,
                                       panel_query_scores=panel_query_scores,
                                       panel_ranking_scores=panel_ranking_scores),
                          key.panel, alpha=alpha)


def extract_outputs(responder: Responder, key: OutputKey, *, set_id: int = 0,
                    alpha: float = DEFAULT_ALPHA, labels_only: bool = False) -> Verdict:
    """Ask `responder` one query set of `key` and judge its answers with the owner's panel.

    A responder that returns labels is judged on labels whatever `labels_only` says;
    `labels_only` reads only the labels of one that returns scores.
    """
    q, r = set_items(key, set_id)
    answers = read_answers(responder.answer(key.queries[q]), len(q), key.n_classes)
    ranking = None
    if answers.has_scores and not labels_only:
        ranking = read_answers(responder.answer(key.ranking_inputs[r]), len(r), key.n_classes)
    if labels_only:
        answers = Answers(labels=answers.labels, scores=None)
    return judge_answers(key, set_id, answers, ranking, panel_query_scores=key.panel_query_scores,
                         panel_ranking_scores=key.panel_ranking_scores, alpha=alpha)


def check_host_answers(key: OutputKey, labels: np.ndarray) -> None:
    """Raise unless `labels` (the host's top-1 on every query) are the key's targets: what a
    key server checks before it accepts an output key for a host."""
    wrong = np.flatnonzero(np.asarray(labels) != key.targets)
    if len(wrong):
        raise InvalidInputError(f"the host does not answer {len(wrong)} of {len(key.targets)} "
                                f"queries as the key says (first: query {int(wrong[0])})")
