"""Datamodules and shards: disjoint, covering, equal length; real multi-process runs; errors before any worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dpgan.data import (
    DatasetNotFoundError,
    DigitsDataModule,
    GaussianMixtureDataModule,
    MNIST5kDataModule,
    ResumableDataLoader,
    ShardSampler,
    TorchvisionDataModule,
    sample_mixture,
    shard_indices,
)



@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_iid_shards_are_disjoint_and_cover(n):
    parts = [shard_indices(103, n, r, "iid", seed=5) for r in range(n)]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 103
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("n", [2, 3, 4, 10])
def test_label_shards_give_each_rank_its_labels(n):
    labels = np.random.default_rng(0).integers(10, size=500)
    parts = [shard_indices(500, n, r, "by_label", labels) for r in range(n)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))
    expected = np.array_split(np.arange(10), n)  # contiguous label groups, written out
    for r in range(n):
        assert set(labels[parts[r]].tolist()) == set(expected[r].tolist())


def test_sampler_has_equal_length_on_every_rank_and_reshuffles():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)  # very unequal label shards
    data = torch.utils.data.TensorDataset(torch.arange(100))
    samplers = [ShardSampler(data, 3, r, "by_label", labels) for r in range(3)]
    assert {len(s) for s in samplers} == {34} and all(len(list(s)) == 34 for s in samplers)
    for r, sampler in enumerate(samplers):
        assert set(sampler) <= set(shard_indices(100, 3, r, "by_label", labels).tolist())
    assert set(samplers[2]) == set(range(90, 100))  # the smallest shard is seen whole, repeating some samples
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first


def test_sampler_resumes_part_way_through_an_epoch_then_runs_whole_epochs():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    reference = ShardSampler(data, 2, 1, seed=3)
    reference.set_epoch(4)
    epoch4 = list(reference)
    reference.set_epoch(5)
    epoch5 = list(reference)
    sampler = ShardSampler(data, 2, 1, seed=3)
    sampler.resume_at(4, 10)
    assert list(sampler) == epoch4[10:]
    sampler.set_epoch(5)
    assert list(sampler) == epoch5
    with pytest.raises(ValueError, match=r"start must be in \[0, 25\), got 25"):
        sampler.resume_at(0, 25)


def test_loader_resumes_at_its_saved_batch_without_drawing_from_the_random_stream():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    loader = ResumableDataLoader(data, batch_size=4, sampler=ShardSampler(data, 2, 0, seed=1), position=lambda: (3, 2))
    assert loader.state_dict() == {"epoch": 3, "batches": 2}
    reference = ShardSampler(data, 2, 0, seed=1)
    reference.set_epoch(3)
    order = list(reference)  # 25 indices: 6 batches of 4, the last index dropped
    loader.load_state_dict({"epoch": 3, "batches": 2})
    torch.manual_seed(0)
    iterator = iter(loader)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # making the iterator drew nothing (an uninterrupted run did, earlier)
    assert [batch[0].tolist() for batch in iterator] == [order[i : i + 4] for i in (8, 12, 16, 20)]
    assert len(list(loader)) == 6  # the next pass is whole

    with pytest.warns(UserWarning, match=r"batch 6 of epoch 3\) lies beyond this run's epoch of 6 batches"):
        loader.load_state_dict({"epoch": 3, "batches": 6})
    assert [batch[0].tolist() for batch in loader] == [order[i : i + 4] for i in range(0, 24, 4)]

    # worker processes take their indices when the iterator is made: the resumed position must be set by then
    workers = ResumableDataLoader(data, batch_size=4, sampler=ShardSampler(data, 2, 0, seed=1), position=lambda: (0, 0),
                                  num_workers=2)
    workers.load_state_dict({"epoch": 3, "batches": 4})
    assert [batch[0].tolist() for batch in workers] == [order[i : i + 4] for i in (16, 20)]


@pytest.mark.parametrize("shard", ["iid", "by_label"])
def test_ranks_train_on_their_own_shards(suite4, shard):
    """4 real processes, one epoch of grid-25 points: disjoint; iid shards together are the whole training set."""
    seen = [np.load(suite4 / f"shards_{shard}" / f"seen_rank{r}.npy") for r in range(4)]
    points, labels = sample_mixture("grid", 2000, 0)
    held_out = np.random.default_rng(0).permutation(2000)[:200]  # the seeded split, redrawn here
    train = np.delete(np.arange(2000), held_out)
    keys = [{tuple(row[:2].round(6)) for row in s} for s in seen]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not keys[a] & keys[b]
    everything = {tuple(p.round(6)) for p in points[train].astype(np.float32)}
    assert {len(s) for s in seen} == {450}  # 1800 / 4 ranks, equal batch counts
    if shard == "iid":
        assert set().union(*keys) == everything
    else:  # label shards differ in size: a larger one shows part of itself each epoch, a smaller one repeats
        assert set().union(*keys) <= everything
        for r in range(4):
            assert set(seen[r][:, 2].astype(int).tolist()) == set(np.array_split(np.arange(25), 4)[r].tolist())


def test_shipped_datasets_are_scaled_to_minus_one_one():
    for module, shape in ((DigitsDataModule(val_size=100), (1, 8, 8)), (MNIST5kDataModule(val_size=500), (1, 28, 28))):
        module.setup()
        x = torch.stack([module.train_set[i][0] for i in range(50)])
        assert x.shape[1:] == shape and x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.99
        assert len(module.val_set) in (100, 500)
    assert DigitsDataModule(flatten=True).load()[0][0][0].shape == (64,)


@pytest.mark.parametrize("make", [lambda: GaussianMixtureDataModule("grid", num_samples=3000, batch_size=64),
                                  lambda: DigitsDataModule(batch_size=32, val_size=100)])
def test_training_batches_are_the_samples_the_sampler_picks(make):
    """The batched fetch (``InMemoryDataset.__getitems__``) gives what indexing sample by sample and collating gives."""
    from torch.utils.data import default_collate

    module = make()
    module.setup()
    loader = module.train_dataloader()
    indices = list(loader.sampler)
    for k, batch in zip(range(3), loader):
        chosen = indices[k * loader.batch_size : (k + 1) * loader.batch_size]
        expected = default_collate([module.train_set[i] for i in chosen])
        assert len(batch) == 2 and all(torch.equal(b, e) for b, e in zip(batch, expected))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: DigitsDataModule(shard="by_class"), "unknown shard 'by_class'; allowed: iid, by_label"),
        (lambda: DigitsDataModule(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (lambda: GaussianMixtureDataModule("spiral"), "unknown mixture 'spiral'; allowed: ring, grid"),
        (lambda: TorchvisionDataModule("svhn"), "unknown torchvision dataset 'svhn'; allowed: mnist, cifar10"),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_files_say_what_to_do(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=rf"{name} not found under '{tmp_path}'.*download=True"):
        TorchvisionDataModule(name, root=tmp_path)


def test_missing_image_folder_says_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"an image folder \(root/<class>/<image>\) not found"):
        TorchvisionDataModule("imagefolder", root=tmp_path / "nowhere", image_size=32)


def test_download_without_network_says_what_to_do(tmp_path):
    module = TorchvisionDataModule("mnist", root=tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)could not download mnist to .*Without network"):
        module.prepare_data()


def test_image_folder_loads_real_images(tmp_path):
    from torchvision.utils import save_image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            save_image(torch.rand(3, 20, 20), tmp_path / label / f"{i}.png")
    module = TorchvisionDataModule("imagefolder", root=tmp_path, image_size=16, shard="by_label", batch_size=2)
    module.setup()
    assert module.train_set[0][0].shape == (3, 16, 16) and sorted(module.train_labels.tolist()) == [0, 0, 0, 1, 1, 1]
