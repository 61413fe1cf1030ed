"""pretokenize -> generator training (resume) -> generate, on a tiny tokenizer and tiny SiT / DiT."""

import json
import re

import pytest
import torch
from interrupting import interrupt_at_call

from softvq import Tokenizer
from softvq.evaluation.generated import sample_folder
from softvq.generation.checkpoint import load_generator
from softvq.generation.latent_sources import LatentSource
from softvq.generation.latents import load_latents
from softvq.generation.pretokenize import pretokenize
from softvq.generation.train import GeneratorTrainConfig, train_generator


def tiny_tokenizer(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    tok.save_pretrained(tmp_path / "tok")
    return tok


def source(n=12):
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(3, 32, 32, generator=g) * 2 - 1, i % 3, f"img{i}") for i in range(n)]
    return LatentSource(iter(samples), ["a", "b", "c"], n)


def test_pretokenize_writes_shards_and_exact_statistics(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    result = pretokenize(tok, source(), tmp_path / "lat", tokenizer_spec=str(tmp_path / "tok"),
                         batch_size=5, shard_size=8, progress=False)
    data = load_latents(tmp_path / "lat")
    assert len(result.shards) == 2 and data.latents.shape == (12, 16, 8)
    assert data.meta["tokenizer_precision"] == "fp32"
    assert data.labels.tolist() == [i % 3 for i in range(12)] and data.names[5] == "img5"
    z = data.latents.double()
    assert abs(data.mean - float(z.mean())) < 1e-9 and abs(data.std - float(z.std(unbiased=False))) < 1e-9
    from fractions import Fraction

    exact = sum(Fraction(v) for v in z.flatten().tolist()) / z.numel()  # the mean in exact arithmetic
    assert data.mean == float(exact)
    used = source()
    tok.train()
    other = pretokenize(tok, used, tmp_path / "other", batch_size=3, shard_size=5, progress=False)
    assert (other.latent_mean, other.latent_std) == (result.latent_mean, result.latent_std)  # any shard split
    assert tok.training  # given back in the mode it came in (it was left in eval mode)
    with pytest.raises(ValueError, match="served an earlier pretokenize; make a new one"):
        pretokenize(tok, used, tmp_path / "third", progress=False)  # was "no samples to pretokenize"
    images = torch.stack([s[0] for s in source().samples])
    assert torch.allclose(data.latents, tok.encode(images).latents, atol=1e-5)
    with pytest.raises(FileExistsError):
        pretokenize(tok, source(), tmp_path / "lat", progress=False)


@pytest.mark.parametrize("objective", ["sit", "dit", "mar"])
def test_training_resumes_exactly_and_generate_writes_images(tmp_path, objective, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # --fid-ref caches reference statistics under ~/.cache
    tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    pretokenize(tok, source(), tmp_path / "lat", tokenizer_spec=str(tmp_path / "tok"), progress=False)
    common = dict(latents=str(tmp_path / "lat"), objective=objective, width=32, depth=1, heads=2, batch_size=4,
                  log_every=1, checkpoint_every=2, cpu=True, diffusion_steps=50)
    if objective == "mar":  # MAR's masks, label and attention dropout all draw from the RNG being resumed
        common.update(head_width=32, head_depth=1, warmup_steps=3)
    straight = train_generator(GeneratorTrainConfig(out=str(tmp_path / "a"), steps=4, **common), progress=False)
    train_generator(GeneratorTrainConfig(out=str(tmp_path / "b"), steps=2, **common), progress=False)
    # the resumed half goes through the command line, so `softvq train-generator` is the same run
    from softvq.cli.main import main

    capsys.readouterr()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if k != "cpu"] + ["--cpu", "--quiet"]
    assert main(["train-generator", f"--out={tmp_path / 'b'}", "--steps=4", *flags]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["last_loss"] == straight["last_loss"]
    a, _ = load_generator(tmp_path / "a" / "generator")
    b, meta = load_generator(tmp_path / "b" / "generator")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    if objective == "sit":  # another generator into the same folder: a clear error, not a size mismatch
        wider = [f for f in flags if not f.startswith("--width=")] + ["--width=64"]
        assert main(["train-generator", f"--out={tmp_path / 'b'}", "--steps=6", *wider]) == 2
        assert "was trained with other settings (another generator: width 32 -> 64)" in capsys.readouterr().err
        assert main(["train-generator", f"--out={tmp_path / 'b'}", "--steps=2", *flags]) == 2
        assert "is already at step 4; --steps 2 would train nothing" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and ("vb" in log[0]) == (objective != "sit")
    assert meta.classes == ["a", "b", "c"] and meta.tokenizer == str(tmp_path / "tok")

    out = tmp_path / "samples"
    guidance = ["--ar-steps", "3"] if objective == "mar" else ["--interval", "0", "0.7"]
    code = main(["generate", str(tmp_path / "a" / "generator"), "--out", str(out), "--classes", "0,c",
                 "--per-class", "2", "--steps", "3", "--cfg", "1.5", *guidance, "--device", "cpu"])
    assert code == 0
    assert len(list((out / "images").glob("*.png"))) == 4 and (out / "grid.png").is_file()
    assert json.loads((out / "samples.json").read_text())["labels"] == [0, 0, 2, 2]
    assert sample_folder(out) == out / "images"  # `softvq eval --samples OUT` scores these, not grid.png
    capsys.readouterr()  # the same command again: a finished run, nothing to sample
    assert main(["generate", str(tmp_path / "a" / "generator"), "--out", str(out), "--classes", "0,c",
                 "--per-class", "2", "--steps", "3", "--cfg", "1.5", *guidance, "--device", "cpu"]) == 0
    assert "already holds all 4 images of these settings" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "a" / "generator"), "--out", str(out), "--classes", "7"]) == 2
    # a wrong --fid-ref is named before any sampling, not after
    code = main(["generate", str(tmp_path / "a" / "generator"), "--out", str(tmp_path / "s2"),
                 "--fid-ref", str(tmp_path / "lat" / "meta.json"), "--device", "cpu"])
    assert code == 2 and "is a file, not a folder of images (--fid-ref takes a .npz" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()
    (tmp_path / "no-images").mkdir()  # were found only once every sample was made
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    for reference, named in (("no-images", "no-images holds no images (.png"),
                             ("broken", f"--fid-ref {tmp_path / 'broken'}: none of its first 1 images is readable, e.g. "
                                        f"{tmp_path / 'broken' / 'a.png'}: not a readable image")):
        code = main(["generate", str(tmp_path / "a" / "generator"), "--out", str(tmp_path / "s2"),
                     "--fid-ref", str(tmp_path / reference), "--device", "cpu"])
        assert code == 2 and named in capsys.readouterr().err and not (tmp_path / "s2").exists()
    from softvq.evaluation.inception import fid_helper_weights_path

    if objective == "sit" and fid_helper_weights_path() is not None:
        # a corrupt reference image is skipped and named once the samples exist, not the end of the run
        (tmp_path / "ref").mkdir()
        for f in sorted((out / "images").glob("*.png"))[:3]:
            (tmp_path / "ref" / f.name).write_bytes(f.read_bytes())
        (tmp_path / "ref" / "000000_broken.png").write_bytes(b"truncated")
        assert main(["generate", str(tmp_path / "a" / "generator"), "--out", str(tmp_path / "s3"), "--classes", "0",
                     "--per-class", "2", "--steps", "2", "--fid-ref", str(tmp_path / "ref"), "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        assert "gFID vs" in captured.out
        saved = json.loads((tmp_path / "s3" / "fid.json").read_text())  # kept with the samples, not only printed
        assert f"{saved['gfid']:.3f}" in captured.out and saved["samples"] == 2
        assert (saved["num_reference"], saved["skipped_reference"]) == (3, 1)  # were in the console's warning alone
        assert saved["reference"] == str(tmp_path / "ref")
        assert "--fid-ref: skipped 1 unreadable image(s) of the first 4, e.g." in captured.err
    # a second run into the same folder would mix its samples with these: refused
    assert main(["generate", str(tmp_path / "a" / "generator"), "--out", str(out), "--classes", "0",
                 "--per-class", "1", "--steps", "2", "--device", "cpu"]) == 2
    assert "choose an empty --out" in capsys.readouterr().err
    assert len(list((out / "images").glob("*.png"))) == 4
    # an image folder (or a run, or a latent set) is not a samples folder: it would gain images/ as a class
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / ".DS_Store").write_bytes(b"")
    assert main(["generate", str(tmp_path / "a" / "generator"), "--out", str(tmp_path / "photos"), "--classes", "0",
                 "--per-class", "1", "--steps", "2", "--device", "cpu"]) == 2
    assert f"{tmp_path / 'photos'} is not empty (it holds cat) and holds no samples.json: writing images/" \
        in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == [".DS_Store", "cat"]


def test_pretokenize_cli_keeps_a_random_preset_so_decoding_matches(tmp_path, capsys):
    from softvq.cli.main import main

    assert main(["pretokenize", str(tmp_path / "lat"), "--bundled", "--model", "softvq-tiny",
                 "--crops-per-photo", "1", "--device", "cpu"]) == 0
    data = load_latents(tmp_path / "lat")
    assert data.latents.shape[1:] == (16, 8) and len(data.classes) == len(data.labels)
    saved = Tokenizer.from_pretrained(data.meta["tokenizer"])  # the exact weights that encoded them
    assert data.meta["tokenizer"] == str(tmp_path / "lat" / "tokenizer") and saved.num_tokens == 16
    # --seed (default 0) seeds the preset's weights, as encode's --seed does: they were whatever the RNG held
    torch.manual_seed(0)
    assert torch.equal(saved.state_dict()["to_latent.weight"],
                       Tokenizer.from_preset("softvq-tiny").state_dict()["to_latent.weight"])


def test_pretokenize_skips_and_counts_unreadable_images(tmp_path, capsys):
    from PIL import Image

    from softvq.cli.main import main

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (40 * i, 90, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(["pretokenize", str(tmp_path / "lat"), "--images", str(tmp_path / "imgs"), "--model", "softvq-tiny",
                 "--device", "cpu"]) == 0
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().err
    data = load_latents(tmp_path / "lat")
    assert len(data.labels) == 4 and data.labels.tolist() == [0, 0, 1, 1] and data.classes == ["a", "b"]
    assert len(data.meta["skipped"]) == 1 and "broken.png" in data.meta["skipped"][0]
    assert data.meta["class_counts"] == [2, 2]


def test_pretokenize_warns_of_a_class_left_without_latents(tmp_path, capsys):
    from PIL import Image

    from softvq.cli.main import main

    for cls in ("cat", "dog", "owl"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 0)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
        Image.new("RGB", (64, 64), (90, 40 * i, 0)).save(tmp_path / "imgs" / "owl" / f"{i}.png")
        (tmp_path / "imgs" / "dog" / f"{i}.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "imgs" / "emu").mkdir()  # no images at all: no class, and the indices after it shift
    assert main(["pretokenize", str(tmp_path / "lat"), "--images", str(tmp_path / "imgs"), "--model", "softvq-tiny",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "1 of 3 class(es) have no latents, all their files unreadable or none there: dog." in err
    assert (f"softvq: warning: left out 1 sub-folder(s) of {tmp_path / 'imgs'} without readable-format images (emu): "
            f"they are no classes, so the class indices count without them") in err
    assert load_latents(tmp_path / "lat").meta["class_counts"] == [2, 0, 2]


def test_bench_gen_prints_flops_beside_the_paper(capsys):
    from softvq.cli.main import main

    from softvq.generation.flops import analytic_macs, analytic_mar_macs
    from softvq.generation.mar import mar_config
    from softvq.generation.models import generator_config

    assert main(["bench", "gen", "--kinds", "dit", "--sizes", "XL", "--layouts", "32 tokens", "--no-throughput"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # ours from the shapes (the analytic count), beside SoftVQ Tab. 1 as printed in the paper
    dit = analytic_macs(generator_config("dit", "XL", num_classes=1000, layout="1d", num_tokens=32, latent_dim=64))
    row = next(line for line in lines if line.startswith("DiT-XL")).split()
    # DiT-XL, 32, tokens, 32, params, GMACs lin, GMACs all, paper-conv (DiT: the linear layers), paper, Δ%
    assert row[5:9] == [f"{dit.linear / 1e9:.2f}", f"{dit.total / 1e9:.2f}", f"{dit.linear / 1e9:.2f}", "14.52"]
    assert row[9] == f"{100 * (dit.linear / 1e9 / 14.52 - 1):+.1f}"
    mar = analytic_mar_macs(mar_config("H", num_tokens=64, latent_dim=32))
    row = next(line for line in lines if line.startswith("MAR-H") and "SoftVQ-BL" in line).split()
    assert row[5:7] == [f"{mar.total / 1e9:.2f}", "86.55"]  # MAR-H on 64 tokens beside Tab. 1
    assert lines[0].startswith("generator efficiency (GMACs only, nothing timed)")  # not "batch 64, 250 steps"


def test_bench_gen_takes_batch_size_as_the_other_commands_call_it():
    from softvq.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "gen", "--batch-size", "8"]).batch == 8
    assert parser.parse_args(["bench", "gen", "--batch", "16"]).batch == 16


def test_bench_gen_times_mar_sampling_whole_at_its_evaluation_setting(monkeypatch, capsys):
    """MAR's throughput column (paper Tab. 1: 0.89 / 2.08 img/s for MAR-H): its sampler timed whole,
    one AR step per token with 100 head steps, no guidance; MAR-H skipped on a CPU above the bound."""
    from softvq.generation import benchmark
    from softvq.generation.mar import MaskedAutoregressive, mar_config

    tiny = mar_config("B", num_tokens=4, latent_dim=3, width=16, depth=1, heads=2, head_width=8, head_depth=1,
                      buffer_size=2, num_classes=5)
    calls, real_sample = [], MaskedAutoregressive.sample

    def sample(self, labels, ar_steps=None, diffusion_steps=100, **kwargs):
        calls.append((len(labels), ar_steps, diffusion_steps, kwargs.get("cfg", 1.0)))
        return real_sample(self, labels, ar_steps, diffusion_steps, **kwargs)

    monkeypatch.setattr(MaskedAutoregressive, "sample", sample)
    state = torch.get_rng_state()
    seconds = benchmark.time_mar_sampling(tiny, 3, torch.device("cpu"), diffusion_steps=5)
    assert seconds > 0 and calls == [(3, 1, 1, 1.0), (3, None, 5, 1.0)]  # warm-up, then the timed whole run
    assert torch.equal(torch.get_rng_state(), state)  # its seeding is its own: the caller's stream is given back

    monkeypatch.setattr(benchmark, "time_mar_sampling", lambda cfg, batch, device, steps: batch / 2.0)
    text = benchmark.mar_table(throughput=True, device="cpu", batch=8, max_gmacs_cpu=80.0, progress=False)
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("MAR-H")}
    assert rows["SoftVQ-L"].split()[-2:] == ["2", "2.08"]  # measured beside the paper's, on 32 tokens (68 GMACs)
    assert "0.89  throughput skipped on CPU (86 GMACs/img; --max-gmacs-cpu)" in rows["SoftVQ-BL"]
    assert benchmark.mar_table(throughput=False).splitlines()[3].split()[-2:] == ["-", "0.12"]


def test_an_interrupted_pretokenize_continues_from_its_last_shard(tmp_path, monkeypatch):
    from PIL import Image

    from softvq.generation.latent_sources import folder_source
    from softvq.generation.latents import PROGRESS_NAME

    tok = tiny_tokenizer(tmp_path)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (40, 40), (20 * i, 255 - 20 * i, 7 * i)).save(tmp_path / "imgs" / "a" / f"{i:02d}.png")
    # read in the batch that crosses the first shard's end, but after its last sample
    (tmp_path / "imgs" / "a" / "04_broken.png").write_bytes(b"\x89PNG not really")
    run = dict(tokenizer_spec=str(tmp_path / "tok"), batch_size=3, shard_size=4, progress=False)
    straight = pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "straight", **run)

    # batches 1-2 read 00..05 (+ the broken file): one shard
    interrupt_at_call(monkeypatch, Tokenizer, "encode_latents", 3)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    monkeypatch.undo()
    progress = json.loads((tmp_path / "cut" / PROGRESS_NAME).read_text())
    assert progress["shards"] == ["latents-00000.safetensors"] and progress["position"] == 4
    assert progress["skipped"] == [] and not (tmp_path / "cut" / "meta.json").exists()

    with pytest.raises(FileExistsError, match="other settings .*shard_size 4 -> 5"):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **{**run, "shard_size": 5})
    retrained = Tokenizer.from_pretrained(tmp_path / "tok")  # other weights under the same spec
    with torch.no_grad():
        retrained.decoder.to_pixel.weight.add_(0.01)
    with pytest.raises(FileExistsError, match="other settings .*tokenizer_sha1"):
        pretokenize(retrained, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    # shards cut by an older crop (the source's identity before it named its crop) are not continued
    saved = json.loads((tmp_path / "cut" / PROGRESS_NAME).read_text())
    older = json.loads(json.dumps(saved))
    del older["settings"]["source"]["crop"]
    (tmp_path / "cut" / PROGRESS_NAME).write_text(json.dumps(older))
    with pytest.raises(FileExistsError, match="other settings .source.crop None -> 'ADM center_crop_arr'"):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    (tmp_path / "cut" / PROGRESS_NAME).write_text(json.dumps(saved))
    (tmp_path / "cut" / ".latents-00001.safetensors.k3j2.tmp").write_bytes(b"half")  # a SIGKILL mid-write
    resumed = pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **{**run, "batch_size": 2})
    assert not list((tmp_path / "cut").glob("*.tmp"))  # no dead shard left in the finished set
    a, b = load_latents(tmp_path / "straight"), load_latents(tmp_path / "cut")
    assert b.names == a.names == [f"a/{i:02d}.png" for i in range(12)]  # none lost, none twice
    assert torch.allclose(a.latents, b.latents, atol=1e-5) and torch.equal(a.labels, b.labels)
    assert resumed.shards == straight.shards == [f"latents-0000{i}.safetensors" for i in range(3)]
    # exact sums: the statistics do not depend on where the run was interrupted
    assert (resumed.latent_mean, resumed.latent_std) == (straight.latent_mean, straight.latent_std)
    assert len(resumed.skipped) == 1 and "04_broken.png" in resumed.skipped[0]
    assert not (tmp_path / "cut" / PROGRESS_NAME).exists()
    with pytest.raises(FileExistsError, match="already holds a finished latent set"):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)


@pytest.mark.parametrize("damaged, whole_before", [("latents-00000", 0), ("latents-00001", 1)])
def test_a_damaged_shard_is_encoded_again_from_the_last_whole_one_before_it(tmp_path, monkeypatch, caplog,
                                                                            damaged, whole_before):
    """Not "delete the folder": the shards before it are kept (ImageNet's are hours of encoding)."""
    from PIL import Image

    from softvq.generation.latent_sources import folder_source
    from softvq.generation.latents import PROGRESS_NAME

    tok = tiny_tokenizer(tmp_path)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (40, 40), (20 * i, 255 - 20 * i, 7 * i)).save(tmp_path / "imgs" / "a" / f"{i:02d}.png")
    (tmp_path / "imgs" / "a" / "04_broken.png").write_bytes(b"\x89PNG not really")  # read inside shard 1
    run = dict(tokenizer_spec=str(tmp_path / "tok"), batch_size=3, shard_size=4, progress=False)
    straight = pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "straight", **run)
    interrupt_at_call(monkeypatch, Tokenizer, "encode_latents", 4)  # 9 samples read: shards 0 and 1 written
    with pytest.raises(KeyboardInterrupt):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    monkeypatch.undo()
    progress = json.loads((tmp_path / "cut" / PROGRESS_NAME).read_text())
    assert progress["shards"] == ["latents-00000.safetensors", "latents-00001.safetensors"]
    assert len(progress["skipped"]) == 1
    shard = tmp_path / "cut" / f"{damaged}.safetensors"
    shard.write_bytes(shard.read_bytes()[:-16])  # a copy cut short, a crash on a file system without order
    kept = (tmp_path / "cut" / "latents-00000.safetensors").stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="softvq"):
        resumed = pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    assert (f"{shard} is damaged (truncated or overwritten): encoding again from it, after the {whole_before} "
            f"whole shard(s) before it") in caplog.text
    if whole_before:  # the whole shard was kept, not written again
        assert (tmp_path / "cut" / "latents-00000.safetensors").stat().st_mtime_ns == kept
    a, b = load_latents(tmp_path / "straight"), load_latents(tmp_path / "cut")
    assert b.names == a.names and torch.allclose(a.latents, b.latents, atol=1e-5) and torch.equal(a.labels, b.labels)
    assert (resumed.latent_mean, resumed.latent_std) == (straight.latent_mean, straight.latent_std)
    assert resumed.skipped == straight.skipped and len(resumed.skipped) == 1  # the broken file counted once
    assert b.meta["class_counts"] == a.meta["class_counts"] == [12]


def test_pretokenize_cli_continues_a_random_preset_with_its_saved_weights(tmp_path, monkeypatch, capsys):
    from softvq.cli.main import main
    from softvq.generation.latent_sources import bundled_source

    command = ["pretokenize", str(tmp_path / "lat"), "--bundled", "--model", "softvq-tiny", "--crops-per-photo", "2",
               "--batch-size", "2", "--shard-size", "2", "--device", "cpu"]
    interrupt_at_call(monkeypatch, Tokenizer, "encode_latents", 3)
    assert main(command) == 130  # Ctrl-C: "interrupted"
    monkeypatch.undo()
    saved = (tmp_path / "lat" / "tokenizer" / "model.safetensors").read_bytes()
    assert main(command) == 0
    assert "continuing with the softvq-tiny weights saved at" in capsys.readouterr().out
    assert (tmp_path / "lat" / "tokenizer" / "model.safetensors").read_bytes() == saved
    data = load_latents(tmp_path / "lat")
    tok = Tokenizer.from_pretrained(data.meta["tokenizer"])
    images = torch.stack([s[0] for s in bundled_source(tok.config.image_size, 2).samples])
    assert torch.allclose(data.latents, tok.encode_latents(images), atol=1e-5)  # both halves: the same weights
    assert main(command) == 2  # a finished set is refused before its tokenizer could be replaced
    assert "already holds a finished latent set (meta.json): train on it with train-generator --latents" in \
        capsys.readouterr().err
    assert (tmp_path / "lat" / "tokenizer" / "model.safetensors").read_bytes() == saved


def test_pretokenize_cli_names_the_model_an_interrupted_set_was_started_with(tmp_path, monkeypatch, capsys):
    from softvq.cli.main import main

    tiny_tokenizer(tmp_path)
    command = ["pretokenize", str(tmp_path / "lat"), "--bundled", "--crops-per-photo", "2", "--batch-size", "2",
               "--shard-size", "2", "--device", "cpu", "--model"]
    interrupt_at_call(monkeypatch, Tokenizer, "encode_latents", 3)
    assert main([*command, str(tmp_path / "tok")]) == 130
    monkeypatch.undo()
    assert "interrupted; the complete shards are kept: run the same command again" in capsys.readouterr().err
    assert main([*command, "softvq-tiny"]) == 2  # not "random softvq-tiny weights ... are gone"
    assert f"started with --model {tmp_path / 'tok'}, not softvq-tiny" in capsys.readouterr().err


def test_generator_training_stops_on_sigterm_with_a_checkpoint_and_continues_exactly(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from softvq.generation import train as train_module

    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    common = dict(latents=str(tmp_path / "lat"), objective="sit", width=32, depth=1, heads=2, batch_size=4,
                  log_every=1, checkpoint_every=100, cpu=True, steps=6)
    straight = train_generator(GeneratorTrainConfig(out=str(tmp_path / "a"), **common), progress=False)

    real_lr = train_module.learning_rate

    def preempted(cfg, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 3 of 6, long before a scheduled checkpoint
        return real_lr(cfg, step)

    monkeypatch.setattr(train_module, "learning_rate", preempted)
    stopped = train_generator(GeneratorTrainConfig(out=str(tmp_path / "b"), **common), progress=False)
    monkeypatch.undo()
    assert stopped["stopped"] and stopped["steps"] == 3 and stopped["export"] is None
    assert "received SIGTERM: stopping after this step" in capsys.readouterr().err
    assert not (tmp_path / "b" / "generator").exists()
    resumed = train_generator(GeneratorTrainConfig(out=str(tmp_path / "b"), **common), progress=False)
    assert "from step 3" in capsys.readouterr().err  # from the stop's checkpoint, not from scratch
    assert not resumed["stopped"] and resumed["last_loss"] == straight["last_loss"]
    a, _ = load_generator(tmp_path / "a" / "generator")
    b, _ = load_generator(tmp_path / "b" / "generator")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_folder_source_decodes_in_worker_processes_in_order(tmp_path):
    from PIL import Image

    from softvq.generation.latent_sources import folder_source

    for cls in ("x", "y"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (48, 40), (50 * i, 30, 200 if cls == "x" else 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "x" / "2b.png").write_bytes(b"\x89PNG not really")
    here, pooled = folder_source(tmp_path, 32), folder_source(tmp_path, 32, workers=2)
    a, b = list(here.samples), list(pooled.samples)
    assert [s[1:] for s in a] == [s[1:] for s in b] and len(a) == 10
    assert all(torch.equal(s[0], t[0]) for s, t in zip(a, b))
    assert len(here.skipped) == len(pooled.skipped) == 1 and "2b.png" in pooled.skipped[0]
    # resuming part-way with workers: the same tail
    tail = list(folder_source(tmp_path, 32, workers=2).resume_from(7))
    assert [s[2] for s in tail] == [s[2] for s in a[6:]]
    with pytest.raises(ValueError, match="workers must be 0"):
        folder_source(tmp_path, 32, workers=-1)


def test_bundled_source_parts_are_slices_of_the_whole():
    from softvq.generation.latent_sources import bundled_source

    whole = list(bundled_source(16, crops_per_photo=3).samples)
    part = list(bundled_source(16, crops_per_photo=3).resume_from(2, 7))  # across a photo boundary
    assert [s[2] for s in part] == [s[2] for s in whole[2:7]]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(part, whole[2:7]))


def _launch_pretokenize(tmp_path, out, processes, interrupt_rank1_at=None):
    """``softvq pretokenize`` of tmp_path/imgs with tmp_path/tok, alone or under torchrun (gloo, CPU).
    ``interrupt_rank1_at``: process 1 gets Ctrl-C in that call of encode_latents, and torchrun stops both."""
    import subprocess
    import sys

    from launching import cpu_process_env, torchrun

    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\n"
        "from softvq import Tokenizer\n"
        "from softvq.cli.main import main\n"
        f"cut = {interrupt_rank1_at!r}\n"
        "if cut and os.environ.get('RANK') == '1':\n"
        "    real, calls = Tokenizer.encode_latents, []\n"
        "    def encode_latents(self, images):\n"
        "        calls.append(1)\n"
        "        if len(calls) == cut:\n"
        "            raise KeyboardInterrupt\n"
        "        return real(self, images)\n"
        "    Tokenizer.encode_latents = encode_latents\n"
        "sys.exit(main(sys.argv[1:]))\n")
    command = (torchrun(processes) if processes > 1 else [sys.executable]) + [str(script), "pretokenize", str(out), "--images", str(tmp_path / "imgs"), "--model",
                str(tmp_path / "tok"), "--batch-size", "2", "--shard-size", "3", "--device", "cpu"]
    return subprocess.run(command, env=cpu_process_env(), capture_output=True, text=True, timeout=180)


def test_two_launched_processes_pretokenize_what_one_does_and_continue_after_an_interruption(tmp_path):
    from PIL import Image

    tiny_tokenizer(tmp_path)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(7):
            Image.new("RGB", (40, 36), (30 * i, 99, 200 if cls == "a" else 9)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "b" / "3x.png").write_bytes(b"\x89PNG not really")  # in process 1's part

    one = _launch_pretokenize(tmp_path, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    cut = _launch_pretokenize(tmp_path, tmp_path / "two", 2, interrupt_rank1_at=3)  # after process 1's first shard
    assert cut.returncode != 0 and not (tmp_path / "two" / "meta.json").exists()
    kept = json.loads((tmp_path / "two" / "progress-r1.json").read_text())
    assert kept["shards"] == ["latents-r1-00000.safetensors"] and not kept["finished"]
    two = _launch_pretokenize(tmp_path, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote 14 latents") == 1 and "by 2 processes" in two.stdout  # the main process reports

    a, b = load_latents(tmp_path / "one"), load_latents(tmp_path / "two")
    assert b.names == a.names and len(a.names) == 14 and torch.equal(a.labels, b.labels)  # source order, none twice
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
    assert (a.mean, a.std) == (b.mean, b.std)  # bit for bit, though the shards and parts differ
    assert b.meta["skipped"] == a.meta["skipped"] and "3x.png" in b.meta["skipped"][0]
    # parts of 7 and 8 source positions, in shards of 3: each part's last shard may be short
    assert b.meta["shards"] == [f"latents-r0-0000{i}.safetensors" for i in range(3)] + \
        [f"latents-r1-0000{i}.safetensors" for i in range(3)]
    assert not list((tmp_path / "two").glob("progress*.json"))
    again = _launch_pretokenize(tmp_path, tmp_path / "one", 2)  # a finished set is refused by every process,
    assert again.returncode != 0 and again.stderr.count("already holds a finished latent set") == 1  # said once


def test_rerunning_a_finished_generator_run_leaves_it_as_it_is(tmp_path, capsys):
    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    cfg = GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / "g"), objective="sit", width=32,
                               depth=1, heads=2, batch_size=4, steps=2, cpu=True)
    train_generator(cfg, progress=False)
    exported = (tmp_path / "g" / "generator" / "model.safetensors").read_bytes()
    again = train_generator(cfg, progress=False)
    assert again["already_finished"] and again["steps"] == 2 and again["last_loss"] is None
    assert "already finished at step 2; pass --steps above 2" in capsys.readouterr().err
    assert (tmp_path / "g" / "generator" / "model.safetensors").read_bytes() == exported

    # other training settings or another latent set are refused, naming them; not continued silently
    import dataclasses
    import shutil

    with pytest.raises(ValueError, match=r"other settings \(lr 0.0001 -> 5e-05\); .*only --steps"):
        train_generator(dataclasses.replace(cfg, steps=3, lr=5e-5), progress=False)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(9), tmp_path / "other",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    with pytest.raises(ValueError, match=r"latent set .*other.* \(another meta.json\)"):
        train_generator(dataclasses.replace(cfg, steps=3, latents=str(tmp_path / "other")), progress=False)
    shutil.copytree(tmp_path / "lat", tmp_path / "moved")  # the same set elsewhere is the same set

    # an export older than the last checkpoint (stopped between the two) is made again, not kept
    state = (tmp_path / "g" / "generator" / "config.json")
    state.write_text(state.read_text().replace('"step": 2', '"step": 1'))
    killed = tmp_path / "g" / "generator" / ".model.safetensors.k1ll.tmp"  # the export a SIGKILL cut short
    killed.write_bytes(b"as large as the model")
    again = train_generator(dataclasses.replace(cfg, latents=str(tmp_path / "moved")), progress=False)
    assert not again.get("already_finished") and "export is from step 1: exporting again" in capsys.readouterr().err
    assert json.loads(state.read_text())["step"] == 2 and not killed.exists()
    assert (tmp_path / "g" / "generator" / "model.safetensors").read_bytes() == exported
    # no step trained in this call: no loss, and JSON strict parsers take (was NaN)
    assert again["first_loss"] is None and again["last_loss"] is None and "NaN" not in json.dumps(again)


def test_damaged_latent_folders_and_run_folders_get_clear_answers(tmp_path):
    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.cli.common import load_tokenizer
    from softvq.generation.checkpoint import GeneratorMeta, save_generator
    from softvq.generation.models import build_generator, generator_config

    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "meta.json").write_text(json.dumps({"format": "softvq-latents", "count": 3}))
    with pytest.raises(ValueError, match="meta.json lacks shards, classes, latent_mean, latent_std"):
        load_latents(tmp_path / "lat")
    (tmp_path / "lat" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        load_latents(tmp_path / "lat")

    model = build_generator(generator_config("sit", "S", num_tokens=4, latent_dim=2, num_classes=2))
    save_generator(model, GeneratorMeta(objective="sit", tokenizer="runs/tok"), tmp_path / "run" / "generator")
    loaded, meta = load_generator(tmp_path / "run")  # a run folder stands for its export
    assert meta.tokenizer == "runs/tok" and torch.equal(next(loaded.parameters()), next(model.parameters()))
    with pytest.raises(CheckpointError, match="is a DiT/SiT/MAR generator .*not a tokenizer; .*tokenizer runs/tok"):
        load_tokenizer(str(tmp_path / "run" / "generator"))


def test_every_generator_training_flag_is_described_and_choices_are_checked(capsys):
    import argparse
    import dataclasses

    from softvq.cli.main import main
    from softvq.cli.train_generator import FLAG_HELP, add_arguments

    assert set(FLAG_HELP) == {f.name for f in dataclasses.fields(GeneratorTrainConfig)}  # none stale, none missing
    actions = {a.dest: a for a in add_arguments(argparse.ArgumentParser())._actions}
    for name, text in FLAG_HELP.items():
        assert actions[name].help.startswith(text) and actions[name].option_strings[0] == "--" + name.replace("_", "-")
    # typed by the annotations: int | None takes an int, float | None a float, bool an --x / --no-x pair
    assert actions["width"].type is int and actions["epochs"].type is float and actions["size"].type is str
    assert actions["seed"].type is int and actions["ema_warmup"].option_strings == ["--ema-warmup", "--no-ema-warmup"]
    with pytest.raises(SystemExit):
        main(["train-generator", "--latents", "x", "--width", "3.5"])
    assert "--width: invalid int value: '3.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-generator", "--latents", "x", "--objective", "flow"])
    assert "--objective: invalid choice: 'flow'" in capsys.readouterr().err


def test_two_launched_processes_train_one_generator_and_continue_it_exactly(tmp_path):
    """Under torchrun on CPUs the processes share one run (not a run each), a log line is the mean
    of its steps over both processes (each process writes down its own step losses here), and a
    continued run replays each process's own random stream."""
    import subprocess

    from launching import cpu_process_env, torchrun

    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\n"
        "from softvq.training.logging import LogWindow\n"
        "from softvq.cli.main import main\n"
        "real_add = LogWindow.add\n"
        "def add(self, values, **kw):\n"
        "    if 'loss' in values:\n"
        f"        with open(f'{tmp_path}/rank{{os.environ[\"RANK\"]}}-losses.txt', 'a') as f:\n"
        "            f.write(repr(float(values['loss'])) + '\\n')\n"
        "    return real_add(self, values, **kw)\n"
        "LogWindow.add = add\n"
        "sys.exit(main(sys.argv[1:]))\n")

    def launch(out, steps, log_every=1):
        command = [*torchrun(2), str(script), "train-generator", "--latents", str(tmp_path / "lat"),
                   "--out", str(out), "--objective", "sit", "--width", "32", "--depth", "1", "--heads", "2",
                   "--batch-size", "4", "--steps", str(steps), "--log-every", str(log_every),
                   "--checkpoint-every", "3", "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True, env=cpu_process_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    straight = launch(tmp_path / "straight", 6, log_every=2)
    assert straight.stdout.count('"steps": 6') == 1  # one result, from the main process
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]  # one run, logged once (not one per process)
    ranks = [[float(v) for v in (tmp_path / f"rank{r}-losses.txt").read_text().split()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6 and ranks[0] != ranks[1]  # each process its own batches
    for record, first in zip(log, (0, 2, 4)):  # the two steps of each line, over both processes
        assert record["loss"] == pytest.approx(sum(sum(r[first:first + 2]) for r in ranks) / 4, rel=1e-6)
    launch(tmp_path / "cut", 3)
    launch(tmp_path / "cut", 6)
    a = (tmp_path / "straight" / "generator" / "model.safetensors").read_bytes()
    assert (tmp_path / "cut" / "generator" / "model.safetensors").read_bytes() == a


def test_tokenizer_paths_are_absolute_and_generate_warns_about_other_tokenizer_weights(tmp_path, monkeypatch, capsys,
                                                                                        caplog):
    from softvq.cli.main import main
    from softvq.resume import weights_sha1

    tok = tiny_tokenizer(tmp_path)
    monkeypatch.chdir(tmp_path)
    pretokenize(tok, source(), "lat", tokenizer_spec="tok", progress=False)  # relative, as in the README
    meta = load_latents(tmp_path / "lat").meta
    assert meta["tokenizer"] == str(tmp_path / "tok") and meta["tokenizer_sha1"] == weights_sha1(tok)
    with pytest.raises(ValueError, match="--tokenizer lat is a latent set"):
        train_generator(GeneratorTrainConfig(latents="lat", out="bad", tokenizer="lat", cpu=True), progress=False)
    with pytest.raises(ValueError, match="--tokenizer 'tokrun' is not a preset name, a tokenizer folder"):
        train_generator(GeneratorTrainConfig(latents="lat", out="bad", tokenizer="tokrun", cpu=True), progress=False)
    # a tokenizer of other latents is refused at the start (it failed in generate, after the training)
    with pytest.raises(ValueError, match=r"--tokenizer softvq-s-64 makes \(64, 32\) latents but the latent set "
                                         r"holds \(16, 8\)"):
        train_generator(GeneratorTrainConfig(latents="lat", out="bad", tokenizer="softvq-s-64", cpu=True),
                        progress=False)
    train_generator(GeneratorTrainConfig(latents="lat", out="gen", objective="sit", width=32, depth=1, heads=2,
                                         batch_size=4, steps=1, cpu=True, tokenizer="tok"), progress=False)
    assert load_generator(tmp_path / "gen")[1].tokenizer == str(tmp_path / "tok")

    other = Tokenizer.from_pretrained(tmp_path / "tok")
    with torch.no_grad():
        other.decoder.to_pixel.weight.add_(0.01)  # training continued under another folder
    other.save_pretrained(tmp_path / "tok2")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the recorded tokenizer is found from any folder
    command = ["generate", str(tmp_path / "gen"), "--classes", "0", "--per-class", "1", "--steps", "2",
               "--device", "cpu", "--out"]
    capsys.readouterr()
    assert main([*command, "same"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*command, "other", "--tokenizer", str(tmp_path / "tok2")]) == 0
    err = capsys.readouterr().err
    assert f"whose weights (sha1 {weights_sha1(other)[:10]}) are not the ones that made the generator's latents " \
           f"(sha1 {weights_sha1(tok)[:10]})" in err
    config = tmp_path / "gen" / "generator" / "config.json"  # a generator of a set made before sha1s were kept
    payload = json.loads(config.read_text())
    del payload["meta"]["tokenizer_sha1"]
    config.write_text(json.dumps(payload))
    assert main([*command, "old", "--tokenizer", str(tmp_path / "tok2")]) == 0
    assert "warning" not in capsys.readouterr().err

    # train-generator says so at its start, not only generate after the whole run
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # not for the tokenizer that made them
    small = dict(objective="sit", width=32, depth=1, heads=2, batch_size=4, steps=1, cpu=True)
    for tokenizer, said in ((str(tmp_path / "tok2"), f"has weights (sha1 {weights_sha1(other)[:10]}) other than those "
                                                     f"that made the latents ({weights_sha1(tok)[:10]}, "),
                            ("softvq-tiny", f"softvq-tiny is a preset with random weights; the latents were made by "
                                            f"{tmp_path / 'tok'}")):
        caplog.clear()
        train_generator(GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / f"gen-{tokenizer[-4:]}"),
                                             tokenizer=tokenizer, **small), progress=False)
        assert said in caplog.text and "pass the tokenizer pretokenize used" in caplog.text


def test_a_changed_source_setting_is_named_alone(tmp_path, monkeypatch, capsys):
    from softvq.cli.main import main

    command = ["pretokenize", str(tmp_path / "lat"), "--bundled", "--model", "softvq-tiny", "--crops-per-photo", "1",
               "--batch-size", "1", "--shard-size", "1", "--device", "cpu"]
    interrupt_at_call(monkeypatch, Tokenizer, "encode_latents", 2)
    assert main(command) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*command, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings (source.seed 0 -> 3); rerun" in err and "'photos'" not in err  # not the source twice


def test_train_generator_says_what_is_wrong_with_its_latents_or_run(tmp_path, monkeypatch, capsys):
    from softvq.cli.main import main

    tiny_tokenizer(tmp_path)
    run = ["train-generator", "--out", str(tmp_path / "g"), "--width", "32", "--depth", "1", "--heads", "2",
           "--batch-size", "4", "--steps", "1", "--cpu", "--quiet"]
    interrupt_at_call(monkeypatch, Tokenizer, "encode_latents", 2)
    assert main(["pretokenize", str(tmp_path / "cut"), "--bundled", "--crops-per-photo", "1", "--batch-size", "1",
                 "--shard-size", "1", "--device", "cpu", "--model", str(tmp_path / "tok")]) == 130
    monkeypatch.undo()
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat", progress=False)
    for latents, named in ((tmp_path / "nope", "latent folder .*nope does not exist"),
                           (tmp_path / "cut", "is an unfinished latent set .*rerun the same pretokenize command"),
                           (tmp_path / "lat" / "meta.json", f"is a file; pass the latent folder that holds it, "
                                                            f"{tmp_path / 'lat'}")):
        capsys.readouterr()
        assert main([*run, "--latents", str(latents)]) == 2
        assert re.search(named, capsys.readouterr().err), latents
    assert main([*run, "--latents", str(tmp_path / "lat"), "--steps", "0"]) == 2
    assert "--steps must be positive, got 0" in capsys.readouterr().err
    assert main([*run, "--latents", str(tmp_path / "lat")]) == 0
    # a rerun without --latents takes the run's settings from its config.json: --steps alone lengthens it
    capsys.readouterr()
    assert main(["train-generator", "--out", str(tmp_path / "g"), "--steps", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"continuing {tmp_path / 'g'} with the settings its config.json records and the flags given (--steps)" in err
    saved = json.loads((tmp_path / "g" / "config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["train"]["width"] == 32 and saved["continued"] == [
        {"at_step": 1, "from_steps": 1, "to_steps": 2}]
    assert main(["train-generator", "--out", str(tmp_path / "g"), "--width", "64", "--quiet"]) == 2  # still checked
    assert "other settings" in capsys.readouterr().err
    # a latent set that moved: --latents says where it is now, the other settings still come from the run
    import shutil

    shutil.move(tmp_path / "lat", tmp_path / "lat-moved")
    assert main(["train-generator", "--out", str(tmp_path / "g"), "--latents", str(tmp_path / "lat-moved"),
                 "--steps", "3", "--quiet"]) == 0
    assert json.loads((tmp_path / "g" / "config.json").read_text())["train"]["width"] == 32
    (tmp_path / "g" / "config.json").write_text("{}")
    assert main(["train-generator", "--out", str(tmp_path / "g"), "--quiet"]) == 2
    assert "config.json holds no train-generator run's settings to continue with; pass --latents" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--objective", "sit", "--schedule", "linear"], "--schedule (the noise schedule) only applies to DiT and MAR"),
    (["--objective", "dit", "--path", "linear"], "--path (the interpolant) only applies to SiT; DiT takes"),
    (["--objective", "sit", "--buffer-size", "4"], "--buffer-size applies only to MAR (--objective mar)"),
    (["--objective", "dit", "--head-width", "8", "--head-depth", "1"], "--head-width, --head-depth apply only to MAR"),
])
def test_train_generator_refuses_settings_its_objective_does_not_use(flags, named, capsys):
    from softvq.cli.main import main

    assert main(["train-generator", "--latents", "lat", *flags]) == 2  # before the latents are read
    assert named in capsys.readouterr().err


def test_log_lines_time_the_steps_actually_run(tmp_path, monkeypatch):
    from softvq.generation import train as train_module

    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat", progress=False)
    clock = iter(range(0, 10_000, 10))  # every reading of the clock 10 s after the last
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    train_generator(GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / "g"), width=32, depth=1,
                                         heads=2, batch_size=4, steps=5, log_every=4, cpu=True), progress=False)
    log = [json.loads(line) for line in (tmp_path / "g" / "log.jsonl").read_text().splitlines()]
    # each step's own time (its two clock readings, 10 s apart), over the steps since the last line:
    # not 10 / 4 for the last line's one step, and without the checkpoint and export between steps
    assert [(r["step"], r["sec_per_step"]) for r in log] == [(4, 10.0), (5, 10.0)]


def test_log_lines_hold_the_means_of_their_steps_and_a_stop_logs_the_steps_since_the_last(tmp_path, monkeypatch):
    """Each record is the mean over the steps since the last one, as DiT's release logs (was: the
    loss of the log step alone), and a stop between lines logs its steps (was: in no record)."""
    import os
    import signal

    from softvq.generation import train as train_module

    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat", progress=False)
    common = dict(latents=str(tmp_path / "lat"), objective="sit", width=32, depth=1, heads=2, batch_size=4,
                  checkpoint_every=100, cpu=True, steps=6)

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    train_generator(GeneratorTrainConfig(out=str(tmp_path / "each"), log_every=1, **common), progress=False)
    each = records("each")
    terms = [k for k in each[0] if k not in ("step", "time", "lr", "ema_decay", "sec_per_step", "nonfinite_steps")]
    assert "loss" in terms and len({r["loss"] for r in each}) == 6  # the steps' losses differ

    def means(steps):
        return {k: pytest.approx(sum(each[s - 1][k] for s in steps) / len(steps), rel=1e-5) for k in terms}

    train_generator(GeneratorTrainConfig(out=str(tmp_path / "four"), log_every=4, **common), progress=False)
    assert [(r["step"], {k: r[k] for k in terms}) for r in records("four")] == \
        [(4, means([1, 2, 3, 4])), (6, means([5, 6]))]

    real_lr = train_module.learning_rate

    def preempted(cfg, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 3, between log lines
        return real_lr(cfg, step)

    monkeypatch.setattr(train_module, "learning_rate", preempted)
    assert train_generator(GeneratorTrainConfig(out=str(tmp_path / "cut"), log_every=4, **common),
                           progress=False)["stopped"]
    monkeypatch.undo()
    train_generator(GeneratorTrainConfig(out=str(tmp_path / "cut"), log_every=4, **common), progress=False)
    assert [(r["step"], {k: r[k] for k in terms}) for r in records("cut")] == \
        [(3, means([1, 2, 3])), (4, means([4])), (6, means([5, 6]))]


def test_config_json_records_no_size_when_the_flags_override_all_it_sets(tmp_path):
    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat", progress=False)
    cfg = GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / "g"), width=32, depth=1, heads=2,
                               batch_size=4, steps=1, cpu=True)
    train_generator(cfg, progress=False)
    config = tmp_path / "g" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["train"]["size"] is None and saved["model"]["width"] == 32  # not "XL" for a 32-wide run
    saved["train"]["size"] = "XL"  # as runs before this recorded it: they still resume
    config.write_text(json.dumps(saved))
    import dataclasses

    assert train_generator(dataclasses.replace(cfg, steps=2), progress=False)["steps"] == 2


def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path, caplog):
    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    # MAR's recipe warm-up is 100 epochs; a short --steps run would never reach the peak lr, silently
    train_generator(GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / "m"), objective="mar",
                                         width=32, depth=1, heads=2, head_width=32, head_depth=1, buffer_size=2,
                                         batch_size=4, steps=2, cpu=True), progress=False)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # the CLI prints it
    assert warning.startswith("the learning-rate warm-up (--warmup-epochs 100: ")
    assert "is not shorter than the run (--steps 2)" in warning


def test_generate_continues_across_spellings_of_the_same_folders_and_checks_fid_ref_first(tmp_path, monkeypatch,
                                                                                             capsys):
    from softvq.cli.main import main

    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    train_generator(GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path / "sit"), width=32, depth=1,
                                         heads=2, batch_size=4, steps=2, cpu=True), progress=False)
    monkeypatch.chdir(tmp_path)
    make = ["--out", "o", "--per-class", "1", "--steps", "2", "--device", "cpu"]
    assert main(["generate", "sit", "--tokenizer", "tok", *make]) == 0
    capsys.readouterr()
    # the run folder and its export, a relative and an absolute path: the same settings, nothing to redo
    assert main(["generate", "sit/generator", "--tokenizer", str(tmp_path / "tok"), *make]) == 0
    assert "already holds all 3 images" in capsys.readouterr().out
    (tmp_path / "bad.npz").write_text("not statistics")
    assert main(["generate", "sit", *make[:1], "o2", *make[2:], "--fid-ref", "bad.npz"]) == 2
    assert "bad.npz is not a reference-statistics .npz" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # refused before sampling


def test_export_at_keeps_the_ema_of_its_steps_and_generate_takes_a_training_checkpoint(tmp_path, capsys, caplog):
    """Supp. Tab. 9 (arXiv Tab. 8) samples one run along training: --export-at folders hold the EMA of their step
    (what the checkpoint of that step holds), outlive --keep-checkpoints, and a kept checkpoint
    loads as the generator an export at its step would be."""
    import shutil

    from safetensors.torch import load_file

    from softvq.checkpoint.pretrained import CheckpointError
    from softvq.cli.main import main
    from softvq.training.checkpointing import checkpoint_path, list_checkpoints

    tiny_tokenizer(tmp_path)
    pretokenize(Tokenizer.from_pretrained(tmp_path / "tok"), source(), tmp_path / "lat",
                tokenizer_spec=str(tmp_path / "tok"), progress=False)
    run = tmp_path / "run"
    common = dict(latents=str(tmp_path / "lat"), out=str(run), objective="sit", width=32, depth=1, heads=2,
                  batch_size=4, checkpoint_every=2, keep_checkpoints=1, cpu=True)
    train_generator(GeneratorTrainConfig(steps=2, export_at=[2], **common), progress=False)
    milestone = run / "generator-step-00000002"
    state = torch.load(checkpoint_path(run, 2), weights_only=True)
    exported = load_file(str(milestone / "model.safetensors"))
    shadow = state["ema"]["shadow"]
    assert set(exported) == set(state["model"]) and set(shadow) <= set(exported)
    assert all(torch.equal(exported[k], shadow.get(k, state["model"][k])) for k in exported)
    assert any(not torch.equal(state["model"][k], v) for k, v in shadow.items())  # the EMA, not the trained weights
    assert json.loads((milestone / "config.json").read_text())["step"] == 2

    # continued with more milestones: step 1 has passed unexported, step 9 lies beyond the end
    capsys.readouterr()
    train_generator(GeneratorTrainConfig(steps=4, export_at=[1, 2, 9], **common), progress=False)
    err = caplog.text  # warnings, which the CLI prints as "softvq: warning: ..."
    assert "--export-at 1: the run is already at step 2, past it, so it cannot be exported any more; its " \
           "checkpoint is not kept either" in err
    assert "--export-at 9 is beyond the run's 4 steps" in err and "--export-at 2" not in err
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004.pt"]  # step 2's checkpoint is gone ...
    assert load_file(str(milestone / "model.safetensors")).keys() == exported.keys()  # ... its export is kept
    assert all(torch.equal(load_file(str(milestone / "model.safetensors"))[k], v) for k, v in exported.items())
    assert not (run / "generator-step-00000001").exists() and not (run / "generator-step-00000009").exists()
    again = train_generator(GeneratorTrainConfig(steps=4, export_at=[4], **common), progress=False)  # finished
    assert again["already_finished"] and (run / "generator-step-00000004").is_dir()  # the step it is at is exported

    # the last checkpoint loads as exactly the final export, weights and meta
    final, final_meta = load_generator(run / "generator")
    from_checkpoint, meta = load_generator(checkpoint_path(run, 4))
    assert meta == final_meta and meta.classes == ["a", "b", "c"] and meta.tokenizer == str(tmp_path / "tok")
    for (name, a), b in zip(final.state_dict().items(), from_checkpoint.state_dict().values()):
        assert torch.equal(a, b), name
    assert not from_checkpoint.training

    # a checkpoint written before checkpoints held the meta takes it from the run's latent set
    old = tmp_path / "old" / "checkpoints" / "step-00000004.pt"
    old.parent.mkdir(parents=True)
    shutil.copy(run / "config.json", tmp_path / "old" / "config.json")
    torch.save({k: v for k, v in torch.load(checkpoint_path(run, 4), weights_only=True).items() if k != "meta"}, old)
    assert load_generator(old)[1] == meta
    shutil.move(tmp_path / "lat", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="before checkpoints recorded their latent statistics, and the latent "
                                              "set its run was started on .* is at none of"):
        load_generator(old)
    shutil.move(tmp_path / "elsewhere", tmp_path / "lat")

    # softvq generate from the intermediate checkpoint writes images
    out = tmp_path / "samples"
    assert main(["generate", str(checkpoint_path(run, 4)), "--out", str(out), "--classes", "0,1",
                 "--per-class", "1", "--steps", "2", "--device", "cpu"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    assert json.loads((out / "samples.json").read_text())["generator"] == str(checkpoint_path(run, 4).resolve())


def test_pretokenize_refuses_a_folder_of_other_files(tmp_path, capsys):
    from PIL import Image

    from softvq.cli.main import main

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 0)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "notes.txt").write_text("mine")  # was: written into, beside the shards
    argv = ["pretokenize", str(tmp_path / "lat"), "--images", str(tmp_path / "imgs"), "--model", "softvq-tiny",
            "--device", "cpu"]
    assert main(argv) == 2
    assert "lat is not empty (it holds notes.txt) and holds no latent set or interrupted pretokenize; choose an " \
           "empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["notes.txt"]
    (tmp_path / "lat" / "notes.txt").unlink()
    assert main(argv) == 0  # an empty one is fine, as before


def test_pretokenize_cli_warns_when_the_latents_collapsed(tmp_path, capsys):
    from softvq.cli.main import main

    tok = tiny_tokenizer(tmp_path)
    with torch.no_grad():
        for p in tok.parameters():
            p.zero_()  # a zero codebook: every latent is 0
    tok.save_pretrained(tmp_path / "zero")
    assert main(["pretokenize", str(tmp_path / "lat"), "--bundled", "--model", str(tmp_path / "zero"),
                 "--crops-per-photo", "1", "--device", "cpu"]) == 0
    assert load_latents(tmp_path / "lat").std == 0
    assert "the tokenizer's latents collapsed" in capsys.readouterr().err


def test_pretokenize_refuses_images_of_another_size_than_the_tokenizers(tmp_path):
    """The tokenizer would encode them (its position embeddings stretch), and meta.json would
    record its own size: generate would then decode to images of the wrong size."""
    tok = tiny_tokenizer(tmp_path)
    small = LatentSource(iter([(torch.rand(3, 16, 16) * 2 - 1, 0, "a")]), ["a"], 1)
    with pytest.raises(ValueError, match=r"gives 16x16 images but the tokenizer takes 32x32; .*folder_source"):
        pretokenize(tok, small, tmp_path / "lat", progress=False)


def test_a_pretokenize_killed_right_after_its_first_shard_continues(tmp_path, monkeypatch):
    """A kill between the first shard and its progress record left "shards but no progress.json":
    the same command could never continue. The record is now written before the first shard."""
    from PIL import Image

    from softvq.generation import pretokenize as module
    from softvq.generation.latent_sources import folder_source
    from softvq.run_lock import RunFolderInUse, RunLock

    tok = tiny_tokenizer(tmp_path)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 9, 200)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    run = dict(tokenizer_spec=str(tmp_path / "tok"), batch_size=2, shard_size=4, progress=False)
    straight = pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "straight", **run)
    real_save, saves = module._Progress.save, []

    def killed_after_the_first_shard(self, path):
        saves.append(len(self.shards))
        if self.shards:  # the shard is on disk, its record is not: as a SIGKILL there leaves it
            raise KeyboardInterrupt
        real_save(self, path)

    monkeypatch.setattr(module._Progress, "save", killed_after_the_first_shard)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    monkeypatch.undo()
    assert saves == [0, 1] and (tmp_path / "cut" / "latents-00000.safetensors").is_file()
    with RunLock(tmp_path / "cut"), pytest.raises(RunFolderInUse, match="this process already holds"):
        pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)  # one at a time
    resumed = pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "cut", **run)
    a, b = load_latents(tmp_path / "straight"), load_latents(tmp_path / "cut")
    assert b.names == a.names and torch.allclose(a.latents, b.latents, atol=1e-5)
    assert (resumed.latent_mean, resumed.latent_std) == (straight.latent_mean, straight.latent_std)
    # a run that failed before its first shard (images of the wrong size) leaves nothing to continue:
    # the corrected rerun is made afresh, not refused as "other settings"
    with pytest.raises(ValueError, match="the source gives 16x16 images but the tokenizer takes 32x32"):
        pretokenize(tok, folder_source(tmp_path / "imgs", 16), tmp_path / "fresh", **run)
    pretokenize(tok, folder_source(tmp_path / "imgs", 32), tmp_path / "fresh", **{**run, "shard_size": 5})
    assert load_latents(tmp_path / "fresh").names == a.names


def test_a_folder_mixing_images_and_class_folders_names_both_ways_out(tmp_path):
    from PIL import Image

    from softvq.generation.latent_sources import folder_source

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "cat" / "0.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"mixes images and class sub-folders; move the loose images into a sub-folder, "
                                         r"or take the whole folder as one class \(--single-class; from Python, "
                                         r"single_class=True\)"):
        folder_source(tmp_path, 32)  # said only the CLI's flag to a Python caller
    assert folder_source(tmp_path, 32, single_class=True).count == 2


def test_pretokenize_names_a_custom_sources_bad_sample_and_whole_number_sizes(tmp_path):
    """Were: label 5 of 2 classes written into the set (a generator failed on it at its first step),
    a NumPy image failed inside torch.stack, and batch_size=2.5 encoded the whole source at once."""
    import numpy as np

    from softvq import Tokenizer
    from softvq.generation.latent_sources import LatentSource
    from softvq.generation.pretokenize import pretokenize

    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})
    image = torch.zeros(3, 32, 32)

    def source(*samples):
        return LatentSource(samples=list(samples), classes=["a", "b"], count=len(samples))

    with pytest.raises(ValueError, match=r"sample 'x1' has label 5; labels are class indices 0 to 1 of its 2 classes"):
        pretokenize(tok, source((image, 0, "x0"), (image, 5, "x1")), tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match=r"sample 'x0' is a ndarray: a LatentSource yields \(3, H, W\) float tensors"):
        pretokenize(tok, source((np.zeros((3, 32, 32), np.float32), 0, "x0")), tmp_path / "b", progress=False)
    for flag, value in (("batch_size", 2.5), ("shard_size", "8")):
        with pytest.raises(TypeError, match=f"{flag} must be a whole number, got {value!r}"):
            pretokenize(tok, source((image, 0, "x0")), tmp_path / "c", progress=False, **{flag: value})
    made = pretokenize(tok, source((image, torch.tensor(1), "x0"), (image, np.int64(0), "x1")), tmp_path / "d",
                       progress=False)  # integer tensors and NumPy integers are class indices too
    # a count that is not the samples' (it splits the work between processes): was taken as it was
    fewer = LatentSource(samples=[(image, 0, "x0")], classes=["a", "b"], count=3)
    with pytest.raises(ValueError, match=r"the source gave 1 of the 3 samples its count, 3, promises"):
        pretokenize(tok, fewer, tmp_path / "e", progress=False)
    more = LatentSource(samples=[(image, 0, "x0"), (image, 1, "x1")], classes=["a", "b"], count=1)
    with pytest.raises(ValueError, match=r"the source gave more samples than its count, 1"):
        pretokenize(tok, more, tmp_path / "f", progress=False)
    assert load_latents(made.folder).labels.tolist() == [1, 0]


def test_pretokenize_checks_the_tokenizer_spec_it_records(tmp_path):
    """Was recorded unchecked into meta.json and every generator export: a folder that does not
    exist, or a preset of other latents, failed only in generate after the training."""
    from softvq import Tokenizer
    from softvq.generation.latent_sources import LatentSource
    from softvq.generation.pretokenize import pretokenize

    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1})

    def source():
        return LatentSource(samples=[(torch.zeros(3, 32, 32), 0, "x0")], classes=["a"], count=1)

    with pytest.raises(ValueError, match=r"tokenizer_spec softvq-s-64 makes \(64, 32\) latents but the tokenizer given "
                                         r"makes \(16, 8\); pass the spec that loads the tokenizer you encode with$"):
        pretokenize(tok, source(), tmp_path / "a", tokenizer_spec="softvq-s-64", progress=False)
    with pytest.raises(ValueError, match=f"tokenizer_spec '{tmp_path / 'nowhere'}' is not a preset name"):
        pretokenize(tok, source(), tmp_path / "b", tokenizer_spec=str(tmp_path / "nowhere"), progress=False)
    tok.save_pretrained(tmp_path / "tok")
    made = pretokenize(tok, source(), tmp_path / "c", tokenizer_spec=str(tmp_path / "tok"), progress=False)
    assert load_latents(made.folder).meta["tokenizer"] == str(tmp_path / "tok")


def test_bundled_source_wants_a_crop_per_photo():
    from softvq.generation.latent_sources import bundled_source

    for value in (0, 2.5):  # 0 was taken, and failed later on an empty set
        with pytest.raises(ValueError, match=f"crops_per_photo must be a whole number of 1 or more, got {value}"):
            bundled_source(32, crops_per_photo=value)
    import numpy as np

    assert bundled_source(32, crops_per_photo=np.int64(1)).count == bundled_source(32, crops_per_photo=1).count


def test_a_continuation_records_every_export_at_of_the_runs_commands(tmp_path):
    """record_continuation: export_at becomes the union over the run's commands, and a changed
    steps is appended to `continued`."""
    import json

    from softvq.generation.run_folder import record_continuation
    from softvq.generation.train_config import GeneratorTrainConfig, recorded_train

    first = GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path), steps=2, export_at=[2])
    saved = {"model": {"kind": "sit"}, "train": recorded_train(first)}
    again = GeneratorTrainConfig(latents=str(tmp_path / "lat"), out=str(tmp_path), steps=4, export_at=[1, 9])
    record_continuation(tmp_path, again, 2, saved)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["train"]["export_at"] == [1, 2, 9]
    assert written["train"]["steps"] == 4
    assert written["continued"] == [{"at_step": 2, "from_steps": 2, "to_steps": 4}]
