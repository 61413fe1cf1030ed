"""FID, reference-statistics caching, Inception Score and precision/recall on feature arrays."""

import hashlib
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from softvq.evaluation import fid as fidlib
from torchvision_peer import prepare_torchvision_import


def correlated(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift + rng.random(d)


def sqrtm_fid(x, y):
    """Independent float64 reference: the textbook formula through scipy.linalg.sqrtm."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def peer_fid():
    """A peer library's FID on (mu, sigma) pairs: pytorch-fid's calculate_frechet_distance (scipy
    sqrtm), or torchmetrics' _compute_fid (eigenvalues of Σ1Σ2) where torchvision, which pytorch-fid
    imports, is not installed. Test-only dependencies: ``pip install --no-deps pytorch-fid==0.3.0
    torchvision==0.28.0`` (see torchvision_peer) or ``pip install torchmetrics``."""
    prepare_torchvision_import()
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance

        return "pytorch-fid", calculate_frechet_distance
    except ImportError:
        pass
    try:
        from torchmetrics.image.fid import _compute_fid
    except Exception:  # not installed, or broken by a torchvision whose ops cannot load
        pytest.skip("no peer FID library: install pytorch-fid (+ torchvision) or torchmetrics")

    def torchmetrics_fid(mu1, s1, mu2, s2):
        t = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (mu1, s1, mu2, s2)]
        return float(_compute_fid(*t))

    return "torchmetrics", torchmetrics_fid


def test_fid_of_a_set_with_itself_is_zero():
    x = correlated(400, 48, 0)
    s = fidlib.FeatureStats.from_features(x)
    assert fidlib.frechet_distance(s, s) < 1e-9 * np.trace(s.cov)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy's sqrtm(disp=) inside pytorch-fid
def test_fid_matches_scipy_sqrtm_and_a_peer_library():
    x, y = correlated(500, 64, 1), correlated(500, 64, 2, shift=0.3)
    ours = fidlib.frechet_distance(fidlib.FeatureStats.from_features(x), fidlib.FeatureStats.from_features(y))
    reference = sqrtm_fid(x, y)
    assert ours == pytest.approx(reference, rel=1e-6)
    name, peer = peer_fid()
    value = peer(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(float(value), rel=1e-3), name
    assert ours > 1.0  # the sets really differ


def test_few_samples_lowrank_route_equals_the_eigh_route():
    """n < D keeps the centred features and takes an n x n SVD; it must give the eigh result."""
    x, y = correlated(20, 64, 7), correlated(15, 64, 8, shift=0.2)
    sx, sy = fidlib.FeatureStats.from_features(x), fidlib.FeatureStats.from_features(y)
    assert sx.centred is not None and sy.centred is not None
    lowrank = fidlib.frechet_distance(sx, sy)
    full = fidlib.frechet_distance(fidlib.FeatureStats(sx.mean, sx.cov, sx.count),
                                   fidlib.FeatureStats(sy.mean, sy.cov, sy.count))
    # The eigh route takes sqrt of the ~1e-15 rounding noise of the D - n zero eigenvalues, so it
    # is the less exact of the two; they agree to that noise.
    assert lowrank == pytest.approx(full, rel=1e-6)
    assert fidlib.FeatureStats.from_features(correlated(100, 64, 9)).centred is None  # n > D: not kept


def test_trace_sqrt_product_is_exact_on_commuting_matrices():
    # Diagonal covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    a, b = np.array([1.0, 4.0, 9.0, 0.0]), np.array([4.0, 1.0, 1.0, 5.0])
    assert fidlib.trace_sqrt_product(np.diag(a), np.diag(b)) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-12)


def test_streaming_statistics_equal_numpy_even_far_from_the_origin():
    x = correlated(301, 16, 3, shift=1e4)
    acc = fidlib.RunningStats()
    for chunk in np.array_split(x, [7, 150, 151]):
        acc.update(torch.from_numpy(chunk))
    s = acc.finalize()
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)
    assert s.count == 301


def test_reference_stats_cache_round_trip_and_checksum(tmp_path):
    files = []
    for name in ("b.png", "a.png"):
        (tmp_path / name).write_bytes(b"12345")
        files.append(tmp_path / name)
    protocol = {"image_size": 256, "num_images": 2}
    checksum = fidlib.dataset_checksum(files, protocol, tmp_path)
    assert checksum == fidlib.dataset_checksum(files[::-1], protocol, tmp_path)  # order-free
    assert checksum != fidlib.dataset_checksum(files, {**protocol, "image_size": 128}, tmp_path)
    assert checksum != fidlib.dataset_checksum(files[:1], protocol, tmp_path)

    stats = fidlib.FeatureStats.from_features(correlated(50, 8, 4))
    path = fidlib.save_reference_stats(tmp_path / "ref.npz", stats, checksum, protocol)
    loaded = fidlib.load_reference_stats(path, checksum)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.count == 50
    with pytest.raises(fidlib.ReferenceStatsError, match="other images or another protocol"):
        fidlib.load_reference_stats(path, "0" * 64)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(fidlib.ReferenceStatsError):
        fidlib.load_reference_stats(tmp_path / "bad.npz")


def same_names_and_sizes(folder, fill, mtime_s):
    """Two files whose names and sizes do not depend on ``fill``, only their bytes do."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(("a.bmp", "sub/b.bmp")):
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([fill + i]) * 100)
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
        files.append(path)
    return files


def test_checksum_tells_same_named_same_sized_files_apart_by_modification_time(tmp_path):
    protocol = {"image_size": 64, "num_images": 2}
    noise = same_names_and_sizes(tmp_path / "noise", 0, 1_700_000_000)
    white = same_names_and_sizes(tmp_path / "white", 255 - 1, 1_700_000_100)
    # the paths are relative to the root: another folder of the same names and sizes used to share the key
    assert fidlib.dataset_checksum(noise, protocol, tmp_path / "noise") != \
        fidlib.dataset_checksum(white, protocol, tmp_path / "white")
    key = fidlib.dataset_checksum(noise, protocol, tmp_path / "noise")
    # a renamed (or moved) dataset folder keeps its key: rename keeps the files' times
    (tmp_path / "noise").rename(tmp_path / "renamed")
    moved = [tmp_path / "renamed" / f.relative_to(tmp_path / "noise") for f in noise]
    assert fidlib.dataset_checksum(moved, protocol, tmp_path / "renamed") == key
    # a file rewritten with the same size (a regenerated image) misses it
    moved[1].write_bytes(b"\x07" * 100)
    assert fidlib.dataset_checksum(moved, protocol, tmp_path / "renamed") != key
    # a missing file is counted, not an error
    assert fidlib.dataset_checksum([*moved, tmp_path / "gone.bmp"], protocol) != \
        fidlib.dataset_checksum(moved, protocol)

    # shards are keyed by their own path, size and time the same way
    shard = tmp_path / "val-000.tar"
    shard.write_bytes(b"\0" * 1024)
    os.utime(shard, ns=(10**18, 10**18))
    before = fidlib.dataset_checksum([str(shard)], protocol)
    shard.write_bytes(b"\1" * 1024)
    assert fidlib.dataset_checksum([str(shard)], protocol) != before
    os.utime(shard, ns=(10**18, 10**18))
    assert fidlib.dataset_checksum([str(shard)], protocol) == before  # the time stands for the content


def test_image_digest_depends_on_the_pixels_not_on_the_batching_or_order():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8))
    whole = fidlib.image_digest(images)
    assert (fidlib.image_digest(images[:2]) + fidlib.image_digest(images[2:])) % (1 << 128) == whole
    assert fidlib.image_digest(images.flip(0)) == whole
    changed = images.clone()
    changed[3, 0, 0, 0] ^= 1
    assert fidlib.image_digest(changed) != whole
    assert fidlib.image_digest(images[:4]) != whole


def test_cache_of_the_old_key_is_not_misread_and_the_digest_round_trips(tmp_path):
    stats = fidlib.FeatureStats.from_features(correlated(30, 8, 4))
    protocol = {"image_size": 64, "num_images": 30}
    files = same_names_and_sizes(tmp_path / "imgs", 0, 1_700_000_000)
    key = fidlib.dataset_checksum(files, protocol, tmp_path / "imgs")
    path = fidlib.save_reference_stats(tmp_path / "ref.npz", stats, key, protocol, digest=2**127 + 5)
    assert fidlib.load_reference_digest(path) == 2**127 + 5
    assert fidlib.load_reference_stats(path, key).count == 30
    # a file written by softvq before the key had modification times: sha256 of the paths and sizes
    h = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode())
    for entry in sorted(f"{f.relative_to(tmp_path / 'imgs').as_posix()}\t{f.stat().st_size}" for f in files):
        h.update(b"\n" + entry.encode())
    old = tmp_path / "old.npz"
    np.savez(old, mu=stats.mean, sigma=stats.cov, count=np.int64(30), checksum=np.str_(h.hexdigest()),
             protocol=np.str_(json.dumps(protocol, sort_keys=True)))
    assert h.hexdigest() != key  # the cache folder never finds it under today's name
    with pytest.raises(fidlib.ReferenceStatsError, match="older softvq, whose checksum left out"):
        fidlib.load_reference_stats(old, key)
    assert fidlib.load_reference_digest(old) is None


def test_inception_score_extremes_and_missing_classifier():
    uniform = torch.zeros(100, 1008)
    assert fidlib.inception_score(uniform, splits=10)[0] == pytest.approx(1.0, abs=1e-9)
    # Confident and evenly spread over 5 classes in every split: IS = 5.
    confident = torch.full((100, 1008), -1e4)
    confident[torch.arange(100), torch.arange(100) % 5] = 0.0
    mean, std = fidlib.inception_score(confident, splits=10)
    assert mean == pytest.approx(5.0, rel=1e-6) and std < 1e-6
    with pytest.raises(ValueError, match="no fc layer"):
        fidlib.inception_score(None)


def numpy_inception_score(logits, splits):
    """Salimans et al.'s IS in numpy float64: per split exp(mean_i KL(p_i ‖ mean_j p_j)), then the
    mean and the (population) std over the splits."""
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(marginal)), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n, splits", [(100, 10), (103, 4)])  # 103: splits of unequal size
def test_inception_score_of_random_logits_equals_a_numpy_implementation(n, splits):
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((n, 1008)) * 3 + rng.standard_normal(1008)  # a shared class bias
    mean, std = fidlib.inception_score(torch.from_numpy(logits).float(), splits=splits)
    ref_mean, ref_std = numpy_inception_score(torch.from_numpy(logits).float().numpy(), splits)
    assert mean == pytest.approx(ref_mean, rel=1e-9) and std == pytest.approx(ref_std, rel=1e-6)
    assert mean > 1.5 and std > 0  # neither extreme


def naive_precision_recall(real, fake, k):
    from sklearn.neighbors import NearestNeighbors

    def inside(manifold, queries):
        # distance to the (k+1)-th neighbour including the point itself
        radii = NearestNeighbors(n_neighbors=k + 1).fit(manifold).kneighbors(manifold)[0][:, k]
        d = np.linalg.norm(queries[:, None, :] - manifold[None, :, :], axis=-1)
        return float((d <= radii[None, :]).any(1).mean())

    return inside(real, fake), inside(fake, real)


def test_precision_recall_matches_a_naive_knn_implementation():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((120, 6))
    fake = rng.standard_normal((90, 6)) * 0.6 + 0.8  # narrower and shifted: precision > recall
    p, r = fidlib.precision_recall(real, fake, k=3, batch_size=32)
    ref_p, ref_r = naive_precision_recall(real, fake, 3)
    assert (p, r) == pytest.approx((ref_p, ref_r), abs=1e-12)
    assert p > r


def test_precision_recall_extremes():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((60, 4))
    assert fidlib.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert fidlib.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_a_sample_batch_given_as_reference_statistics_is_named_as_one(tmp_path):
    """generate --npz's pack passed to --fid-ref read as 'mu is not a file in the archive'."""
    np.savez(tmp_path / "samples.npz", np.zeros((2, 8, 8, 3), np.uint8), np.arange(2))
    with pytest.raises(fidlib.ReferenceStatsError, match=r"is a sample batch \(images in arr_0\), not reference "
                                                      r"statistics .*eval --samples"):
        fidlib.load_reference_stats(tmp_path / "samples.npz")
