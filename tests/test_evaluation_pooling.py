"""The original's metric: candidates pooled over run files by prompt, Best-of-N over K disjoint
groups with the first maximum, against a plain re-statement of its script; bad pools."""

import random

import pytest

from msjax.evaluation import PooledProblem, pool_candidates, pooled_best_of_n


def original_metric(runs, n):
    """The original's metric script, re-stated: runs are lists of
    {"prompt", "answer", "correct": [...], "scores": [...]} rows (its files, in order)."""
    jobs = {}
    for run in runs:
        for row in run:
            job = jobs.setdefault(row["prompt"], {"correct": [], "scores": []})
            job["correct"] = job["correct"] + row["correct"]
            job["scores"] = job["scores"] + row["scores"]
    k = min(len(j["scores"]) for j in jobs.values()) // n
    accs = []
    for i in range(k):
        hits = 0
        for job in jobs.values():
            scores = job["scores"][i * n : (i + 1) * n]
            correct = job["correct"][i * n : (i + 1) * n]
            if correct[scores.index(max(scores))]:
                hits += 1
        accs.append(hits / len(jobs))
    return sum(accs) / len(accs), k


def _random_runs(rng, problems=5, runs=4):
    out = []
    for _ in range(runs):
        run = []
        for p in rng.sample(range(problems), problems):  # each file lists problems in its order
            m = rng.randint(1, 6)
            run.append(
                {
                    "prompt": f"problem {p}",
                    "answer": str(p),
                    "correct": [rng.random() < 0.4 for _ in range(m)],
                    "scores": [rng.choice([0.1, 0.5, 0.5, 0.9]) for _ in range(m)],  # ties
                }
            )
        out.append(run)
    return out


def _rows(runs):
    return [(r["prompt"], r["answer"], r["correct"], r["scores"]) for run in runs for r in run]


@pytest.mark.parametrize("seed", range(20))
def test_pooled_best_of_n_equals_the_original_metric(seed):
    rng = random.Random(seed)
    runs = _random_runs(rng)
    pooled = pool_candidates(_rows(runs))
    for n in (1, 2, 3):
        if min(len(p.scores) for p in pooled) < n:
            continue
        expected, k = original_metric(runs, n)
        got = pooled_best_of_n(pooled, n)
        assert got["accuracy"] == pytest.approx(expected)
        assert (got["groups"], got["n"], got["problems"]) == (k, n, len(pooled))


def test_pooling_keeps_run_order_and_first_maximum():
    rows = [
        ("q1", "7", [False, True], [0.9, 0.9]),  # a tie: the first (wrong) one is chosen
        ("q2", "3", [True], [0.2]),
        ("q1", "7", [True, False], [0.1, 0.8]),  # run 2 of q1: its candidates 3 and 4
        ("q2", "3", [False, True, True], [0.5, 0.7, 0.1]),
    ]
    pooled = pool_candidates(rows)
    assert pooled[0] == PooledProblem("q1", "7", [False, True, True, False], [0.9, 0.9, 0.1, 0.8])
    assert [p.key for p in pooled] == ["q1", "q2"]
    got = pooled_best_of_n(pooled, 2)
    # group 0: q1 picks cand 0 (wrong), q2 picks cand 1 (0.5 > 0.2; wrong) -> 0
    # group 1: q1 picks cand 3 (0.8; wrong), q2 picks cand 3 (0.7; right) -> 0.5
    assert got["per_group"] == [0.0, 0.5] and got["accuracy"] == 0.25 and got["groups"] == 2
    assert pooled_best_of_n(pooled, 4)["groups"] == 1


def test_bad_pools_are_refused():
    with pytest.raises(ValueError, match="'q' has gold answer '1' in one row and '2'"):
        pool_candidates([("q", "1", [True], [0.1]), ("q", "2", [True], [0.1])])
    with pytest.raises(ValueError, match="'q': 2 correctness flags but 1 scores"):
        pool_candidates([("q", "1", [True, False], [0.1])])
    pooled = pool_candidates([("q", "1", [True], [0.1]), ("r", "2", [True] * 3, [0.1] * 3)])
    with pytest.raises(ValueError, match="'q' has 1 candidates, fewer than n=2"):
        pooled_best_of_n(pooled, 2)
    with pytest.raises(ValueError, match="no problems"):
        pooled_best_of_n([], 2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"NaN or \+inf"):
            pooled_best_of_n(pool_candidates([("q", "1", [True], [bad])]), 1)


def test_minus_infinity_is_never_chosen_while_its_group_has_another():
    """-inf marks a candidate that may not be chosen (a pruned one); a group of only such
    candidates picks its first (wrong when it is)."""
    inf = float("inf")
    pooled = pool_candidates([("q", "1", [False, True, False, False], [-inf, 0.1, -inf, -inf])])
    assert pooled_best_of_n(pooled, 2)["per_group"] == [1.0, 0.0]
