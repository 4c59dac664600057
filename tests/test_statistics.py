"""The comparison's statistics (result_stat.comparison.statistics) and tuning on constructed predictions:
the paired hierarchical bootstrap, Holm's adjustment, the verdicts and the choice on validation."""

import numpy as np
import pytest

from fedxvit.errors import FedXViTError
from result_stat.comparison import statistics as st
from result_stat.comparison.plan import parse_seeds
from result_stat.comparison.tuning import choose

N = 200  # images per class


def predictions(labels, correct) -> dict:
    """Confident predictions, right exactly where `correct` says."""
    return {
        "labels": list(labels),
        "probs": [[0.9, 0.1] if (y == 0) == bool(c) else [0.1, 0.9] for y, c in zip(labels, correct)],
    }


def one_site(extra_right: int = 0, base_right: int = 140) -> dict:
    """N Healthy then N Tumor images; right on `base_right` of each class, plus `extra_right` more of each."""
    labels = [0] * N + [1] * N
    right = np.zeros(2 * N)
    for start in (0, N):
        right[start : start + base_right + extra_right] = 1
    return predictions(labels, right)


def test_identical_models_differ_by_exactly_zero():
    model = {0: {"a": one_site()}, 1: {"a": one_site(10)}}
    resampler = st.Resampler({"a": model[0]["a"]["labels"]}, [0, 1], replicates=500)
    for statistic in (st.POOLED, st.HOSPITAL_MEAN):
        d = st.paired_difference(resampler, model, model, statistic)
        assert d["difference"] == 0 and d["ci"] == [0.0, 0.0] and d["p"] == 1.0


@pytest.mark.parametrize("k", [10, 30])
def test_a_model_right_on_k_more_images_of_n_differs_by_k_over_n(k):
    reference, method = {0: {"a": one_site()}}, {0: {"a": one_site(k)}}
    resampler = st.Resampler({"a": reference[0]["a"]["labels"]}, [0])
    d = st.paired_difference(resampler, method, reference, st.POOLED)
    assert d["difference"] == pytest.approx(k / N)
    assert sum(d["ci"]) / 2 == pytest.approx(k / N, abs=0.01)  # the interval is centred on it
    assert d["ci"][0] > 0 and d["p"] < 0.01
    reverse = st.paired_difference(resampler, reference, method, st.POOLED)
    assert reverse["difference"] == pytest.approx(-k / N) and reverse["ci"][1] < 0


def test_resampling_the_seeds_widens_the_interval_when_seeds_disagree():
    """Same images, two seeds: a method +k on both seeds vs +k on one and -k on the other."""
    reference = {0: {"a": one_site()}, 1: {"a": one_site()}}
    steady = {0: {"a": one_site(20)}, 1: {"a": one_site(20)}}
    swinging = {0: {"a": one_site(60)}, 1: {"a": one_site(-20)}}  # mean +20 as well
    resampler = st.Resampler({"a": reference[0]["a"]["labels"]}, [0, 1])
    calm = st.paired_difference(resampler, steady, reference, st.POOLED)
    wild = st.paired_difference(resampler, swinging, reference, st.POOLED)
    assert calm["difference"] == pytest.approx(wild["difference"])
    assert wild["half_width"] > 2 * calm["half_width"]


def test_the_mean_of_hospitals_weighs_each_hospital_once():
    """A small hospital where the method is perfect moves the mean of hospitals far more than the pooled score."""
    big, small_labels = one_site(), [0] * 10 + [1] * 10
    reference = {0: {"big": big, "small": predictions(small_labels, [1] * 5 + [0] * 5 + [1] * 5 + [0] * 5)}}
    method = {0: {"big": big, "small": predictions(small_labels, [1] * 20)}}
    resampler = st.Resampler({"big": big["labels"], "small": small_labels}, [0])
    hospitals = st.paired_difference(resampler, method, reference, st.HOSPITAL_MEAN)
    pooled = st.paired_difference(resampler, method, reference, st.POOLED)
    assert hospitals["difference"] == pytest.approx(0.25) and pooled["difference"] == pytest.approx(10 / 420)


def test_holm_on_a_hand_computed_family():
    # sorted: a 0.01 x 3 = 0.03; c 0.03 x 2 = 0.06; b 0.04 x 1 = 0.04 -> kept at the running max 0.06
    assert st.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert st.holm({"a": 0.5, "b": 0.9}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1


def test_verdicts_follow_the_adjusted_p_and_the_margin():
    assert st.verdict(0.05, [0.02, 0.08], 0.01) == "better"
    assert st.verdict(-0.05, [-0.08, -0.02], 0.01) == "worse"
    assert st.verdict(0.004, [-0.015, 0.019], 0.6) == "equivalent"
    assert st.verdict(0.004, [-0.03, 0.04], 0.6) == "inconclusive"
    alone = {"a": {"difference": 0.03, "ci": [0.01, 0.05], "p": 0.02}}
    assert st.verdicts(alone)["a"]["verdict"] == "better"
    # the same difference among three: Holm multiplies the smallest p by 3 (0.06), the others by 2 and 1
    family = {name: {"difference": 0.03, "ci": [0.01, 0.05], "p": p} for name, p in zip("abc", (0.02, 0.03, 0.04))}
    st.verdicts(family)
    assert [family[k]["p_adjusted"] for k in "abc"] == pytest.approx([0.06, 0.06, 0.06])
    assert {family[k]["verdict"] for k in "abc"} == {"inconclusive"}


def test_unpaired_or_repeated_inputs_are_refused():
    with pytest.raises(FedXViTError, match="seed 1 is given twice"):
        parse_seeds("0,1,1")
    with pytest.raises(FedXViTError, match="each training seed may appear once"):
        st.Resampler({"a": [0, 1]}, [0, 0])
    resampler = st.Resampler({"a": [0] * N + [1] * N}, [0], replicates=200)
    other = {0: {"a": one_site()}}
    other[0]["a"]["labels"] = other[0]["a"]["labels"][::-1]
    with pytest.raises(FedXViTError, match="site a's test labels differ"):
        st.paired_difference(resampler, other, {0: {"a": one_site()}}, st.POOLED)
    with pytest.raises(FedXViTError, match=r"no predictions for seed\(s\) \[0\]"):
        st.paired_difference(resampler, {1: {"a": one_site()}}, {0: {"a": one_site()}}, st.POOLED)


def test_gap_share_only_when_the_gap_is_real():
    resampler = st.Resampler({"a": [0] * N + [1] * N}, [0])
    fedavg, half, central = ({0: {"a": one_site(k)}} for k in (0, 20, 40))
    centralized = st.paired_difference(resampler, central, fedavg, st.POOLED)
    method = st.paired_difference(resampler, half, fedavg, st.POOLED)
    st.verdicts({"centralized": centralized})
    share = st.gap_share(method, centralized)
    assert share["status"] == "ok" and share["share"] == pytest.approx(0.5) and share["ci"][0] < 0.5 < share["ci"][1]
    assert st.gap_share(method, {**centralized, "verdict": "inconclusive"})["status"] == "n/a"


def test_the_tuner_chooses_on_validation_even_where_test_would_choose_otherwise():
    """Value set A is better on validation, B on test: A is chosen, whatever test says."""
    good, bad = {"a": one_site(40)}, {"a": one_site()}
    grid = [{"mu": 0.01}, {"mu": 0.1}]
    results = [{"validation": good, "test": bad}, {"validation": bad, "test": good}]
    chosen = choose(grid, results)
    assert chosen["chosen"] == {"mu": 0.01} and chosen["validation_scores"][0] > chosen["validation_scores"][1]
    assert choose(grid, results[::-1])["chosen"] == {"mu": 0.1}
    assert choose(grid, [results[0], results[0]])["chosen"] == {"mu": 0.01}  # a tie keeps the job's default
    assert choose(grid, [None, results[1]])["chosen"] == {"mu": 0.1}  # a failed run is never chosen
    # a method whose sites keep personalized models is tuned on them: its global model's validation is ignored
    personal = [{**results[1], "personalized_validation": good}, {**results[0], "personalized_validation": bad}]
    assert choose(grid, personal)["chosen"] == {"mu": 0.01}
