"""NgramHasher: hand-computed cases, agreement with a loop transcription of the reference
algorithm, and invariants (shapes, ranges, determinism, pad, decode-time == full sequence).

    pytest tests/unit/model/test_hashing.py -q
"""

import numpy as np
import pytest
import torch

from engram_model.hashing import NgramHasher, is_prime, next_prime

I64_MAX = np.iinfo(np.int64).max


def small_hasher(**kw):
    args = dict(engram_vocab_size=[10, 20], max_ngram_size=3, n_head_per_ngram=2, layer_ids=[1, 2],
                seed=0, pad_id=0, compressed_vocab_size=10)
    args.update(kw)
    return NgramHasher(**args)


def reference_hash(ids, vocab, max_n, heads, layer_ids, seed, pad_id, cv):
    """A scalar, loop-per-token transcription of the reference algorithm with Python ints."""
    def prime(c):
        return c >= 2 and all(c % d for d in range(2, int(c ** 0.5) + 1))

    used, sizes = set(), {}
    for L in layer_ids:
        sizes[L] = []
        for n in range(2, max_n + 1):
            start, hs = vocab[n - 2] - 1, []
            for _ in range(heads):
                c = start + 1
                while not (prime(c) and c not in used):
                    c += 1
                used.add(c)
                hs.append(c)
                start = c
            sizes[L].append(hs)
    half = max(1, (I64_MAX // cv) // 2)
    out = {}
    for L in layer_ids:
        r = np.random.default_rng(seed + 10007 * L).integers(0, half, size=max_n, dtype=np.int64)
        mult = [2 * int(x) + 1 for x in r]
        B, T = len(ids), len(ids[0])
        res = np.zeros((B, T, (max_n - 1) * heads), dtype=np.int64)
        for b in range(B):
            for t in range(T):
                col = 0
                for n in range(2, max_n + 1):
                    mix = 0
                    for k in range(n):
                        tok = ids[b][t - k] if t - k >= 0 else pad_id
                        mix ^= tok * mult[k]
                    assert 0 <= mix <= I64_MAX          # fits int64: numpy/torch cannot overflow
                    for p in sizes[L][n - 2]:
                        res[b, t, col] = mix % p
                        col += 1
        out[L] = res
    return sizes, out


def test_primes_hand_computed():
    h = small_hasher()
    # Layer 1: n=2 from 9 -> 11, 13; n=3 from 19 -> 23, 29. Layer 2 skips primes already used:
    # n=2 from 9 -> 17, 19; n=3 from 19 -> 31, 37.
    assert h.table_sizes == {1: [[11, 13], [23, 29]], 2: [[17, 19], [31, 37]]}
    assert h.offsets[1].tolist() == [0, 11, 24, 47] and h.table_rows(1) == 11 + 13 + 23 + 29
    assert h.offsets[2].tolist() == [0, 17, 36, 67] and h.table_rows(2) == 17 + 19 + 31 + 37


def test_multipliers_hand_computed():
    h = small_hasher()
    half = (I64_MAX // 10) // 2
    r = np.random.default_rng(0 + 10007 * 1).integers(0, half, size=3, dtype=np.int64)
    assert h.multipliers[1].tolist() == (2 * r + 1).tolist()
    # Pinned values: a change in numpy's generator or in the formula would break served tables.
    assert h.multipliers[1].tolist() == [759362766141463323, 47959300183862325, 356331584946896373]
    assert all(m % 2 == 1 and 0 < m < I64_MAX // 10 for m in h.multipliers[1].tolist())


def test_hash_hand_computed():
    h = small_hasher()
    m0, m1, m2 = (int(x) for x in h.multipliers[1])
    ids = np.array([[1, 2, 3, 4, 5]])
    got = h.hash(ids)[1]
    # t=0: the bigram is (1, pad=0), the trigram (1, pad, pad).
    assert got[0, 0].tolist() == [(1 * m0) % 11, (1 * m0) % 13, (1 * m0) % 23, (1 * m0) % 29]
    # t=2: bigram (3, 2), trigram (3, 2, 1).
    bi, tri = (3 * m0) ^ (2 * m1), (3 * m0) ^ (2 * m1) ^ (1 * m2)
    assert got[0, 2].tolist() == [bi % 11, bi % 13, tri % 23, tri % 29]
    assert got[0].tolist() == [[4, 8, 22, 0], [2, 0, 19, 9], [1, 9, 10, 7], [0, 8, 14, 0], [7, 8, 17, 11]]


@pytest.mark.parametrize("cv,vocab,max_n,heads,layers,seed,pad", [
    (10, [10, 20], 3, 2, [1, 2], 0, 0),
    (5000, [997, 1009, 1500], 4, 3, [1, 15], 7, 4999),
    (129280, [129280 * 5, 129280 * 5], 3, 8, [1, 15], 0, 2),     # the reference demo's shape
])
def test_matches_reference_transcription(cv, vocab, max_n, heads, layers, seed, pad):
    rng = np.random.default_rng(cv)
    ids = rng.integers(0, cv, size=(2, 13))
    h = NgramHasher(vocab, max_n, heads, layers, seed, pad, cv)
    sizes, ref = reference_hash(ids.tolist(), vocab, max_n, heads, layers, seed, pad, cv)
    assert h.table_sizes == sizes
    got_np, got_t = h.hash(ids), h.hash(torch.from_numpy(ids))
    for L in layers:
        np.testing.assert_array_equal(got_np[L], ref[L])
        assert isinstance(got_t[L], torch.Tensor) and got_t[L].dtype == torch.int64
        np.testing.assert_array_equal(got_t[L].numpy(), ref[L])


def test_shapes_ranges_and_row_ids():
    h = NgramHasher([500, 700], 3, 4, [1, 3], seed=3, pad_id=1, compressed_vocab_size=4000)
    ids = np.random.default_rng(0).integers(0, 4000, size=(3, 50))
    hashes, rows = h.hash(ids), h.row_ids(ids)
    for L in (1, 3):
        assert hashes[L].shape == (3, 50, 8) and hashes[L].dtype == np.int64
        assert (hashes[L] >= 0).all() and (hashes[L] < h.head_sizes[L]).all()
        np.testing.assert_array_equal(rows[L], hashes[L] + h.offsets[L])
        assert (rows[L] >= h.offsets[L]).all() and (rows[L] < h.offsets[L] + h.head_sizes[L]).all()
        assert rows[L].max() < h.table_rows(L)
    # all primes distinct across layers and orders
    allp = [p for L in (1, 3) for o in h.table_sizes[L] for p in o]
    assert len(set(allp)) == len(allp) and all(is_prime(p) for p in allp)
    assert h.table_sizes[1][0][0] == next_prime(499, set())


def test_deterministic_and_seeded():
    ids = np.random.default_rng(1).integers(0, 300, size=(2, 20))
    a = small_hasher(compressed_vocab_size=300).hash(ids)
    b = small_hasher(compressed_vocab_size=300).hash(ids)
    c = small_hasher(compressed_vocab_size=300, seed=1).hash(ids)
    for L in a:
        np.testing.assert_array_equal(a[L], b[L])
    assert any((a[L] != c[L]).any() for L in a)


def test_pad_only_affects_first_positions():
    ids = np.random.default_rng(2).integers(0, 300, size=(2, 12))
    a = small_hasher(compressed_vocab_size=300, pad_id=0).hash(ids)
    b = small_hasher(compressed_vocab_size=300, pad_id=7).hash(ids)
    for L in a:
        # positions >= max_n - 1 = 2 never look before the start
        np.testing.assert_array_equal(a[L][:, 2:], b[L][:, 2:])
        assert (a[L][:, :2] != b[L][:, :2]).any()
    # a sequence that starts with pad tokens hashes like one with nothing before it
    h = small_hasher(compressed_vocab_size=300, pad_id=7)
    padded = np.concatenate([np.full((2, 2), 7), ids], axis=1)
    for L, v in h.hash(padded).items():
        np.testing.assert_array_equal(v[:, 2:], h.hash(ids)[L])


def test_decode_time_hashes_equal_full_sequence():
    h = NgramHasher([100, 120, 140], 4, 2, [0, 2], seed=5, pad_id=3, compressed_vocab_size=50)
    ids = torch.randint(0, 50, (2, 17))
    full = h.hash(ids)
    for t in range(ids.shape[1]):
        window = ids[:, max(0, t - 3):t + 1]        # the new token and the previous max_n - 1
        step = h.hash(window)
        for L in full:
            assert torch.equal(step[L][:, -1], full[L][:, t])


def test_torch_device_and_errors():
    h = small_hasher()
    out = h.hash(torch.tensor([[1, 2, 3]]))
    assert out[1].device.type == "cpu"
    with pytest.raises(ValueError):
        h.hash(np.array([[1, 10]]))          # id >= compressed_vocab_size
    with pytest.raises(ValueError):
        h.hash(np.array([1, 2]))             # not [B, T]
    with pytest.raises(ValueError):
        small_hasher(pad_id=10)
    with pytest.raises(ValueError):
        small_hasher(engram_vocab_size=[10])
    assert h.hash(np.zeros((1, 0), dtype=np.int64))[1].shape == (1, 0, 4)


def test_is_prime():
    sieve = np.ones(5000, dtype=bool)
    sieve[:2] = False
    for i in range(2, 71):
        sieve[i * i::i] = False
    assert [n for n in range(5000) if is_prime(n)] == np.nonzero(sieve)[0].tolist()
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1) and not is_prime(3215031751)  # strong pseudoprime to 2,3,5,7
