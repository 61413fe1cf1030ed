"""PSNR / SSIM against scikit-image, exact codebook usage and perplexity, latent moments."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from softvq.data.images import bundled_photos, read_image
from softvq.evaluation.metrics import codebook_rows, probs_rows
from softvq.data.images import quantize_to_uint8
from softvq.evaluation.metrics import CodebookUsage, RunningMoments, psnr, ssim


def image_pair():
    """A real photo and a noisy, slightly shifted copy, as uint8-valued floats (B=2)."""
    photo = torch.stack([read_image(p, 48, resize=True) for p in bundled_photos()[:2]])
    x = quantize_to_uint8(photo).double()
    g = torch.Generator().manual_seed(0)
    y = (x.roll(1, dims=-1) + 12 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 255).round()
    return x, y


def skimage_scores(x, y, data_range):
    a, b = x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy()
    s = [structural_similarity(a[i], b[i], data_range=data_range, channel_axis=-1, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False) for i in range(len(a))]
    p = [peak_signal_noise_ratio(a[i], b[i], data_range=data_range) for i in range(len(a))]
    return np.array(s), np.array(p)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_psnr_ssim_match_scikit_image(scale):
    x, y = image_pair()
    x, y = x / (255.0 / scale), y / (255.0 / scale)
    ref_ssim, ref_psnr = skimage_scores(x, y, scale)
    np.testing.assert_allclose(ssim(x, y, data_range=scale).numpy(), ref_ssim, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(psnr(x, y, data_range=scale).numpy(), ref_psnr, rtol=1e-10)
    assert 0.1 < ref_ssim.min() < 0.99  # a real, non-trivial comparison


def test_wrong_data_range_is_an_error_and_a_wrong_range_changes_ssim():
    x, y = image_pair()
    with pytest.raises(ValueError, match="data_range=255"):
        ssim(x, y, data_range=1.0)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        psnr(x / 127.5 - 1, y / 127.5 - 1, data_range=1.0)
    # a reconstruction a little past [0, 1] (decoders overshoot) was told to map [-1, 1] again
    overshoot = (y / 255) * 1.08 - 0.04
    with pytest.raises(ValueError, match=r"overshoots its range a little: clamp it first, x.clamp\(0, 1\)"):
        psnr(x / 255, overshoot, data_range=1.0)
    assert torch.isfinite(psnr(x / 255, overshoot.clamp(0, 1), data_range=1.0)).all()
    # The research code's data_range=2.0 on [0, 1] images gives a different (wrong) SSIM.
    right = ssim(x / 255, y / 255, data_range=1.0)
    assert not torch.allclose(right, ssim(x / 255, y / 255, data_range=2.0))
    with pytest.raises(ValueError, match="second image batch contains NaN"):
        psnr(x / 255, y * float("nan"), data_range=1.0)  # was a NaN score
    with pytest.raises(TypeError, match=r"torch.from_numpy\(a\).permute\(0, 3, 1, 2\)"):
        psnr(x.numpy(), y.numpy(), data_range=255)  # was an AttributeError from inside


def test_identical_images():
    x, _ = image_pair()
    assert torch.allclose(ssim(x, x, data_range=255), torch.ones(2, dtype=torch.float64))
    assert torch.isinf(psnr(x, x, data_range=255)).all()


def test_usage_and_perplexity_all_codes_used_evenly():
    k = 16
    u = CodebookUsage(k)
    for _ in range(3):
        u.update(torch.randperm(k).repeat(2))
    s = u.summary()
    assert s["codebook_usage"] == 1.0
    assert s["codebook_perplexity"] == pytest.approx(k, rel=1e-12)
    assert s["codes_counted"] == 3 * 2 * k


def test_usage_and_perplexity_one_code_used():
    u = CodebookUsage(16)
    u.update(torch.full((100,), 7))
    s = u.summary()
    assert s["codebook_usage"] == 1 / 16
    assert s["codebook_perplexity"] == pytest.approx(1.0, abs=1e-12)


def test_perplexity_of_an_uneven_distribution_and_several_codebooks():
    u = CodebookUsage(4, num_codebooks=2)
    # codebook 0 uses codes 0,0,0,1 ; codebook 1 uses 2,3,2,3
    u.update(torch.tensor([[0, 2], [0, 3], [0, 2], [1, 3]]))
    p = np.array([0.75, 0.25])
    expected0 = math.exp(-(p * np.log(p)).sum())
    torch.testing.assert_close(u.perplexity_per_codebook(), torch.tensor([expected0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(u.usage_per_codebook(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="outside"):
        u.update(torch.tensor([[4, 0]]))


def test_soft_perplexity_of_uniform_posteriors_is_k():
    u = CodebookUsage(8)
    u.update_probs(torch.full((5, 8), 1 / 8))
    assert u.summary()["soft_perplexity"] == pytest.approx(8.0)


def test_segment_codebooks_are_counted_separately():
    # 2 segments of 3 tokens: tokens 0-2 use codebook 0, tokens 3-5 codebook 1.
    idx = torch.tensor([[1, 1, 1, 5, 5, 5]])
    rows = codebook_rows(idx, segments=2)
    assert rows.tolist() == [[1, 5], [1, 5], [1, 5]]
    probs = torch.nn.functional.one_hot(idx, 8).float()
    assert probs_rows(probs, segments=2).argmax(-1).tolist() == rows.tolist()
    # segments x groups (or residual levels): each (segment, group) pair is a codebook of its own;
    # the segments were merged into the groups' codebooks before
    idx = torch.tensor([[[1, 2], [1, 2], [5, 6], [5, 6]]])  # (B, L=4, P=2), 2 segments of 2 tokens
    rows = codebook_rows(idx, segments=2)
    assert rows.tolist() == [[1, 2, 5, 6], [1, 2, 5, 6]]
    assert probs_rows(torch.nn.functional.one_hot(idx, 8).float(), segments=2).argmax(-1).tolist() == rows.tolist()
    assert codebook_rows(idx).tolist() == [[1, 2], [1, 2], [5, 6], [5, 6]]  # one segment: as before


def test_latent_moments_equal_direct_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + 0.3
    m = RunningMoments()
    m.update(z[:3])
    m.update(z[3:])
    s = m.summary()
    assert s["latent_mean"] == pytest.approx(z.double().mean().item(), rel=1e-12)
    assert s["latent_std"] == pytest.approx(z.double().std(unbiased=False).item(), rel=1e-10)
    np.testing.assert_allclose(s["latent_channel_std"], z.double().reshape(-1, 3).std(0, unbiased=False), rtol=1e-10)


def test_entropy_of_weights_takes_counts_of_any_dtype_and_a_zero_row_has_none():
    from softvq.evaluation.metrics import entropy_of_weights

    for dtype in (torch.int64, torch.float32, torch.float64):  # float32 rows of zeros gave NaN
        h = entropy_of_weights(torch.tensor([[0, 0, 0], [1, 1, 0], [2, 2, 4]], dtype=dtype))
        expected = [0.0, math.log(2), -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))]
        assert torch.allclose(h, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
