"""softvq's own checkpoint format: bit-identical round trip, strict loading, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from softvq import Tokenizer
from softvq.checkpoint.pretrained import CheckpointError, load_pretrained


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Tokenizer.from_preset("softvq-tiny").eval()
    model.latent_mean, model.latent_std = 0.5, 2.0
    return model, model.save_pretrained(tmp_path / "ckpt")


def test_save_load_round_trip_is_bit_identical(saved):
    model, folder = saved
    again = Tokenizer.from_pretrained(folder)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config
    assert (again.latent_mean, again.latent_std) == (0.5, 2.0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(model.reconstruct(x), again.reconstruct(x))


def _edit_weights(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_key_is_named(saved):
    _, folder = saved
    _edit_weights(folder, lambda s: s.pop("decoder.blocks.2.mlp.fc1.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys decoder\.blocks\.2\.mlp\.fc1\.bias"):
        load_pretrained(folder)


def test_unexpected_key_is_named(saved):
    _, folder = saved
    _edit_weights(folder, lambda s: s.update({"encoder.extra_token": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys encoder\.extra_token"):
        load_pretrained(folder)


def test_shape_mismatch_is_named(saved):
    _, folder = saved
    _edit_weights(folder, lambda s: s.update({"to_latent.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"to_latent\.bias: file \(5,\) vs model \(8,\)"):
        load_pretrained(folder)


def test_corrupt_weights_give_a_one_line_error(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or unreadable") as err:
        load_pretrained(folder)
    assert "\n" not in str(err.value)


def test_release_folder_is_refused_with_a_pointer_to_from_official(saved):
    _, folder = saved
    (folder / "config.json").write_text(json.dumps({"codebook_size": 8192, "tau": 0.07}))
    with pytest.raises(CheckpointError, match="from_official"):
        load_pretrained(folder)


def test_a_mistyped_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from softvq.checkpoint.pretrained import CheckpointError, resolve

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint folder at 'runs/demoo'; runs/ holds the folders demo"):
        resolve("runs/demoo", ["config.json"])


def test_a_bad_key_in_config_json_names_the_file(tmp_path):
    import json

    from softvq import Tokenizer
    from softvq.checkpoint.pretrained import CheckpointError

    folder = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "tok")
    payload = json.loads((folder / "config.json").read_text())
    payload["config"]["num_tokenz"] = 3
    (folder / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"tok/config.json: .*num_tokenz"):
        Tokenizer.from_pretrained(folder)


def test_saved_files_get_the_permissions_of_plainly_written_ones(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "tok")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    for name in ("config.json", "model.safetensors"):  # mkstemp alone made them 0600: unreadable to colleagues
        assert stat.S_IMODE((tmp_path / "tok" / name).stat().st_mode) == plain == 0o644


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_named_with_the_fix(saved):
    folder = saved[1]
    with pytest.raises(ValueError, match=r"'cuda' \(map_location\) asked for but CUDA is not available; load with "
                                         r"map_location='cpu'"):
        load_pretrained(folder, map_location="cuda")  # was a bare AssertionError from torch
    with pytest.raises(ValueError, match=r"unknown device 'gpu' \(map_location\); use cpu, cuda"):
        load_pretrained(folder, map_location="gpu")


def test_hub_ids_are_told_from_mistyped_local_paths_in_one_place(tmp_path, monkeypatch):
    from softvq.checkpoint.pretrained import resolve
    from softvq.checkpoint.specs import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert looks_like_hub_id("SoftVQVAE/softvq-b-64")
    for local in ("runs/nop", "runs/demo", "./org/name", "/org/name", "~/org/name", "name", "a/b/c"):
        assert not looks_like_hub_id(local), local
    with pytest.raises(CheckpointError, match=r"no checkpoint folder at 'runs/nop'; runs/ holds the folders demo$"):
        resolve("runs/nop", ["config.json"])  # a mistyped run, not a repository to download
    with pytest.raises(CheckpointError, match=r"no checkpoint folder at 'a/b/c' \(and it is not a hub id"):
        resolve("a/b/c", ["config.json"])
    for i in range(9):
        (tmp_path / "runs" / f"r{i}").mkdir()  # a long listing says how much it leaves out
    with pytest.raises(CheckpointError, match=r"runs/ holds the folders demo, r0, .*, r6 and 2 more$"):
        resolve("runs/nop", ["config.json"])
    with pytest.raises(CheckpointError, match=r"no checkpoint folder at '/nonexistent-softvq'; / holds the folders"):
        resolve("/nonexistent-softvq", ["config.json"])  # the root is "/", not "//"


def test_loading_a_checkpoint_leaves_the_callers_random_stream_alone(tmp_path):
    """The model is built at random and its weights then replaced: that draw must not move the
    caller's global generator (a seeded script would sample differently after a load)."""
    saved = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "tok")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loaded = Tokenizer.from_pretrained(saved)
    loaded.with_generative_decoder(4)
    assert torch.equal(torch.rand(3), expected)


def test_latent_statistics_that_would_break_a_generator_are_refused_on_save_and_load(tmp_path):
    """A NaN latent_mean was written as the invalid JSON literal NaN, a std of 0 was kept (a
    generator divides by it), and a mean without a std saved neither."""
    model = Tokenizer.from_preset("softvq-tiny")
    for mean, std, said in ((float("nan"), 1.0, "finite mean and a positive std, got nan and 1.0"),
                            (0.1, 0.0, "finite mean and a positive std, got 0.1 and 0.0"),
                            (0.1, None, "must be numbers, got 0.1 and None")):
        model.latent_mean, model.latent_std = mean, std
        with pytest.raises(ValueError, match=said):
            model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    model.latent_mean, model.latent_std = 0.25, 2.0
    folder = model.save_pretrained(tmp_path / "good")
    loaded = Tokenizer.from_pretrained(folder)
    assert (loaded.latent_mean, loaded.latent_std) == (0.25, 2.0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_std": -1.0}))  # edited by hand
    with pytest.raises(CheckpointError, match=r"config.json: latent_mean / latent_std must be a finite mean and a "
                                              r"positive std, got 0.25 and -1.0"):
        Tokenizer.from_pretrained(folder)


def test_a_float64_model_comes_back_in_float64(tmp_path):
    """It was loaded as float32 without a word: the saved digits were rounded away."""
    torch.manual_seed(0)
    model = Tokenizer.from_preset("softvq-tiny").double()
    loaded = Tokenizer.from_pretrained(model.save_pretrained(tmp_path / "f64"))
    assert loaded.to_latent.weight.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    x = torch.rand(1, 3, model.config.image_size, model.config.image_size, dtype=torch.float64) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(loaded.encode_latents(x), model.encode_latents(x))


def test_a_config_json_with_a_mean_and_no_std_is_refused(tmp_path):
    """A hand-edited config.json with latent_mean but latent_std null must be refused by name, not
    loaded with no latent statistics at all."""
    torch.manual_seed(0)
    model = Tokenizer.from_preset("softvq-tiny")
    model.latent_mean, model.latent_std = 0.25, 2.0
    folder = model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "latent_std": None}))
    with pytest.raises(CheckpointError, match=r"config.json: latent_mean / latent_std must be numbers, "
                                              r"got 0.25 and None"):
        Tokenizer.from_pretrained(folder)


def test_a_real_generator_checkpoint_with_all_its_keys_is_named_a_generator(tmp_path):
    """train-generator's checkpoints hold more than model/ema/step (optimizer, rng, meta, ...): they are
    still named a generator's checkpoint, not "not a softvq train checkpoint"."""
    file = tmp_path / "step-00000002.pt"
    torch.save({"model": {}, "optimizer": {}, "ema": {"shadow": {}}, "step": 2, "rng": [], "meta": {},
                "nonfinite_steps": 0, "train": {}, "latents_sha1": "x"}, file)
    with pytest.raises(CheckpointError, match=r"is a checkpoint of a generator \(train-generator\), not of a "
                                              r"tokenizer"):
        Tokenizer.from_pretrained(file)
