import pytest
import torch

from mdcore.data.sampler import domain_balanced_batches, domain_quota


def test_quota_sums_to_the_batch_and_follows_the_mix():
    counts = {0: 600, 1: 300, 2: 100}
    assert domain_quota(counts, 64, "uniform") == {0: 22, 1: 21, 2: 21}
    natural = domain_quota(counts, 100, "natural")
    assert natural == {0: 60, 1: 30, 2: 10}
    assert sum(domain_quota(counts, 7, {0: 1.0, 2: 3.0}).values()) == 7
    with pytest.raises(ValueError, match="domain_mix"):
        domain_quota(counts, 8, {5: 1.0})


def test_workers_get_disjoint_slices_of_each_global_batch_with_the_configured_mix():
    domains = torch.tensor([0] * 300 + [1] * 150 + [2] * 30)
    per_rank = [list(domain_balanced_batches(domains, 48, rank=r, world=2, epoch=3, seed=1, mix="natural"))
                for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 480 // 48
    seen = []
    for a, b in zip(*per_rank):
        assert len(a) == len(b) == 24
        merged = torch.cat([a, b])
        assert len(set(merged.tolist())) == 48  # the two workers' slices are disjoint
        assert torch.bincount(domains[merged], minlength=3).tolist() == [30, 15, 3]
        seen += merged.tolist()
    assert sorted(seen) == list(range(480))  # natural mix: one epoch visits every image once


def test_uniform_mix_oversamples_the_scarce_domain():
    domains = torch.tensor([0] * 300 + [1] * 150 + [2] * 30)
    for a, b in zip(*[domain_balanced_batches(domains, 48, rank=r, world=2, seed=1) for r in (0, 1)]):
        assert torch.bincount(domains[torch.cat([a, b])], minlength=3).tolist() == [16, 16, 16]


def test_same_seed_same_batches_and_epochs_differ():
    domains = torch.tensor([0] * 50 + [1] * 50)
    one = list(domain_balanced_batches(domains, 10, epoch=0, seed=0))
    two = list(domain_balanced_batches(domains, 10, epoch=0, seed=0))
    other = list(domain_balanced_batches(domains, 10, epoch=1, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not all(torch.equal(a, b) for a, b in zip(one, other))


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="divisible"):
        next(domain_balanced_batches(torch.zeros(10, dtype=torch.long), 5, world=2))


def test_a_dataset_smaller_than_one_batch_still_gets_a_step():
    batches = list(domain_balanced_batches(torch.tensor([0, 0, 1]), 8, rank=0, world=2))
    assert len(batches) == 1 and len(batches[0]) == 4
