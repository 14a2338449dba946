from mdcore.eval.promotion import decide


def test_first_model_becomes_champion():
    assert decide(None, {"a": 0.5}).promote


def test_promote_only_if_no_domain_gets_worse():
    champion = {"a": 0.90, "b": 0.80}
    better_everywhere = decide(champion, {"a": 0.92, "b": 0.80})
    assert better_everywhere.promote and better_everywhere.deltas["a"] > 0
    one_worse = decide(champion, {"a": 0.99, "b": 0.78})
    assert not one_worse.promote and one_worse.worse == ["b"] and "b" in one_worse.reason
    within_tolerance = decide(champion, {"a": 0.99, "b": 0.78}, tolerance=0.03)
    assert within_tolerance.promote


def test_a_domain_the_candidate_was_not_scored_on_blocks_promotion():
    decision = decide({"a": 0.9, "b": 0.8}, {"a": 0.95})
    assert not decision.promote and decision.worse == ["b"]
