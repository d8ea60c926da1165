import numpy as np
import pytest

from fedmeta.data.tasks import TaskError, get_task
from fedmeta.data.tasks.digits import _all_digits, class_split


def test_digits_has_40_classes_split_without_overlap():
    x, y = _all_digits()
    assert x.shape == (7188, 1, 8, 8) and set(np.unique(y)) == set(range(40))
    split = class_split()
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 40 and set.union(*parts) == set(range(40))
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])


def test_digits_sites_are_non_iid_and_disjoint():
    task = get_task("digits-fewshot", num_sites=10)
    train = set(class_split()["train"])
    seen_ids: set[str] = set()
    class_sets = []
    for s in range(10):
        r = task.site_records(s)
        classes = set(np.unique(r.y).tolist())
        assert classes <= train and len(classes) >= task.n_way
        assert len(classes) < len(train)  # a subset: non-IID
        assert not (seen_ids & set(r.record_ids))
        seen_ids |= set(r.record_ids)
        class_sets.append(classes)
    assert len({frozenset(c) for c in class_sets}) > 1


def test_digits_episode_is_every_record_of_n_classes_relabelled():
    task = get_task("digits-fewshot", n_way=5)
    r = task.site_records(0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pool = task.episode_pool(r, rng)
        labels, counts = np.unique(pool.y, return_counts=True)
        assert labels.tolist() == [0, 1, 2, 3, 4]
        # each episode label is one site class, with all of that class's records
        per_class = dict(zip(*np.unique(r.groups, return_counts=True), strict=True))
        assert sorted(counts.tolist()) in [sorted(c) for c in _class_count_sets(per_class)]


def _class_count_sets(per_class):
    from itertools import combinations

    return [[int(per_class[c]) for c in combo] for combo in combinations(per_class, 5)]


@pytest.mark.parametrize("name", ["digits-fewshot", "sine", "breast-cancer-sites"])
def test_removing_a_record_changes_no_other_records_membership(name):
    """The neighbouring relation the accountant assumes: D and D minus one record give the
    same pool minus that record (same round seed), for every record tried."""
    task = get_task(name, num_sites=6)
    r = task.site_records(1)
    ids = np.arange(len(r))
    probe = np.random.default_rng(5).choice(len(r), size=8, replace=False)
    for seed in range(3):
        full = task.episode_pool(r, np.random.default_rng(seed))
        full_keys = {x.tobytes() for x in full.x}
        for j in probe:
            keep = ids != j
            smaller = task.episode_pool(r.subset(keep), np.random.default_rng(seed))
            assert {x.tobytes() for x in smaller.x} == full_keys - {r.x[j].tobytes()}


def test_digits_eval_uses_only_held_out_classes():
    task = get_task("digits-fewshot")
    x, y = _all_digits()
    held = set(class_split()["test"])
    rng = np.random.default_rng(1)
    ep = task.eval_episode("test", rng, shots=5, query=15)
    assert ep.support_x.shape == (25, 1, 8, 8) and ep.query_x.shape == (75, 1, 8, 8)
    lookup = {x[i].tobytes(): int(y[i]) for i in range(len(y))}
    assert {lookup[img.tobytes()] for img in ep.support_x} <= held


def test_supervised_pool_uses_fixed_global_labels():
    task = get_task("digits-fewshot")
    pool = task.supervised_pool(task.site_records(2))
    assert pool.y.min() >= 0 and pool.y.max() < task.supervised_out_dim() == 24


def test_sine_sites_have_their_own_amplitude_band():
    task = get_task("sine", num_sites=4)
    amps = [np.abs(task.site_records(s).y).max() for s in range(4)]
    assert amps[0] < amps[-1]
    ep = task.eval_episode("test", np.random.default_rng(0), shots=10, query=50)
    assert ep.support_x.shape == (10, 1) and ep.query_y.shape == (50, 1)


def test_breast_cancer_sites_have_covariate_shift():
    task = get_task("breast-cancer-sites", num_sites=6)
    means = np.array([task.site_records(s).x.mean(0) for s in range(6)])
    assert np.abs(means - means.mean(0)).mean() > 0.2
    ep = task.eval_episode("val", np.random.default_rng(0), shots=3, query=10)
    assert set(np.unique(ep.support_y)) == {0, 1}


def test_bad_task_settings_are_one_line_errors():
    with pytest.raises(TaskError, match="unknown task"):
        get_task("mnist")
    with pytest.raises(TaskError, match="n-way"):
        get_task("digits-fewshot", n_way=30, num_sites=2).site_records(0)
