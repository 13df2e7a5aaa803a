"""ShardLoader: (x, y) shapes and shift, determinism, exact resume, doc-aligned windows, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.shards import ShardLoader, ShardWriter, TokenDataset


@pytest.fixture
def tokens_dir(tmp_path):
    """Two train shards (split mid-document) of 60 docs with varied lengths; token = position % 997."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 80, size=60)
    stream = np.arange(int(lengths.sum())) % 997
    with ShardWriter(tmp_path, "train", vocab_size=1000, shard_tokens=1500) as w:
        pos = 0
        for n in lengths:
            w.add_document(stream[pos:pos + n])
            pos += n
    assert len(w.paths) >= 2
    return tmp_path, stream, np.cumsum(lengths) - lengths


def test_dataset_concatenates(tokens_dir):
    d, stream, starts = tokens_dir
    ds = TokenDataset(d)
    assert len(ds) == len(stream)
    np.testing.assert_array_equal(ds.doc_starts, starts)
    np.testing.assert_array_equal(ds.get(1490, 1510), stream[1490:1510])  # crosses a shard boundary


def test_batches_shape_and_shift(tokens_dir):
    d, _, _ = tokens_dir
    loader = ShardLoader(d, batch_size=4, seq_len=16, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # stream[p] = p % 997, so a contiguous slice of the stream steps by 1 (mod 997)
    assert np.all(np.diff(x.numpy(), axis=1) % 997 == 1)


def test_deterministic_and_seeded(tokens_dir):
    d, _, _ = tokens_dir
    a = [ShardLoader(d, 4, 16, seed=3).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = ShardLoader(d, 4, 16, seed=4).next_batch()[0]
    assert not torch.equal(a[0], b)


@pytest.mark.parametrize("doc_aligned", [False, True])
def test_resume_equals_uninterrupted(tokens_dir, doc_aligned):
    d, _, _ = tokens_dir
    ref = ShardLoader(d, 8, 32, seed=7, doc_aligned=doc_aligned)
    steps = ref.steps_per_epoch * 2 + 3  # crosses epoch boundaries
    full = [ref.next_batch() for _ in range(steps)]
    first = ShardLoader(d, 8, 32, seed=7, doc_aligned=doc_aligned)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    resumed = ShardLoader(d, 8, 32, seed=7, doc_aligned=doc_aligned)
    resumed.load_state_dict(state)
    for x_ref, y_ref in full[5:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_resume_rejects_other_settings(tokens_dir):
    d, _, _ = tokens_dir
    state = ShardLoader(d, 8, 32).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        ShardLoader(d, 8, 16).load_state_dict(state)


def test_sequential_in_order(tokens_dir):
    d, stream, _ = tokens_dir
    loader = ShardLoader(d, 2, 10, shuffle=False)
    x, y = loader.next_batch()
    np.testing.assert_array_equal(x.numpy().ravel(), stream[:20])
    np.testing.assert_array_equal(y.numpy()[1], stream[11:21])


def test_epoch_covers_every_window_once(tokens_dir):
    d, stream, _ = tokens_dir
    T = 10
    loader = ShardLoader(d, 1, T, shuffle=True, seed=0)
    starts = loader._epoch_starts(0)
    assert len(np.unique(starts)) == len(starts) == loader.steps_per_epoch
    assert np.all(np.diff(np.sort(starts)) == T) and starts.max() + T + 1 <= len(stream)
    assert starts.min() < T and len(stream) - (starts.max() + T + 1) < T  # nothing left uncovered


def test_doc_aligned_windows_start_at_documents(tokens_dir):
    d, _, starts = tokens_dir
    T = 32
    loader = ShardLoader(d, 4, T, doc_aligned=True, seed=0)
    win = loader._epoch_starts(0)
    ends = np.append(starts[1:], len(TokenDataset(d)))
    doc = np.searchsorted(starts, win, side="right") - 1
    assert np.all((win - starts[doc]) % T == 0) and np.all(win < ends[doc])
    fits = starts[starts + T + 1 <= len(TokenDataset(d))]
    assert set(fits.tolist()) <= set(win.tolist())  # every document start begins a window


def test_ranks_split_the_global_batch(tokens_dir):
    d, _, _ = tokens_dir
    whole = ShardLoader(d, 4, 16, seed=2).next_batch()[0]
    r0 = ShardLoader(d, 2, 16, seed=2, rank=0, world_size=2).next_batch()[0]
    r1 = ShardLoader(d, 2, 16, seed=2, rank=1, world_size=2).next_batch()[0]
    assert torch.equal(torch.cat([r0, r1]), whole)


def test_too_little_data(tokens_dir):
    d, _, _ = tokens_dir
    with pytest.raises(ValueError, match="lower seq_len"):
        ShardLoader(d, 1, 100_000)
    with pytest.raises(ValueError, match="lower batch_size"):
        ShardLoader(d, 10_000, 64)
