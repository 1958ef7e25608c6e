"""Prompt lookup: the longest matching tail, its latest earlier occurrence, as tokens arrive."""

from __future__ import annotations

from model_server.engine.prompt_lookup import MAX_NGRAM, MIN_NGRAM, PromptLookup


def test_the_tokens_after_the_tails_earlier_occurrence_are_proposed() -> None:
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 9, 2, 3])
    assert lookup.propose(3) == (4, 5, 6)
    assert lookup.propose(1) == (4,)
    assert lookup.propose(0) == ()


def test_the_longest_tail_wins_over_a_later_shorter_match() -> None:
    # "7 2 3" occurred once (followed by 8); "2 3" occurred later too (followed by 5).
    lookup = PromptLookup([7, 2, 3, 8, 1, 2, 3, 5, 0, 7, 2, 3])
    assert lookup.propose(2) == (8, 1)
    # Among equal tails the most recent occurrence counts.
    lookup = PromptLookup([2, 3, 8, 0, 2, 3, 5, 1, 2, 3])
    assert lookup.propose(1) == (5,)


def test_no_match_and_too_short_tails_propose_nothing() -> None:
    assert PromptLookup().propose(4) == ()
    assert PromptLookup([1, 2, 3, 4]).propose(4) == ()
    # A one-token match is not enough.
    assert MIN_NGRAM == 2
    assert PromptLookup([5, 1, 6, 5]).propose(2) == ()


def test_appended_tokens_extend_the_index_and_a_proposal_stops_at_the_end() -> None:
    lookup = PromptLookup([1, 2, 3])
    lookup.extend([1, 2])
    assert len(lookup) == 5
    assert lookup.propose(8) == (3, 1, 2)  # what follows runs to the end of the sequence
    lookup.extend([9])
    assert lookup.propose(8) == ()


def test_a_tail_longer_than_the_largest_ngram_matches_on_its_last_tokens() -> None:
    run = list(range(10, 10 + MAX_NGRAM + 2))
    lookup = PromptLookup([*run, 99, 0, *run])
    assert lookup.propose(2) == (99, 0)
