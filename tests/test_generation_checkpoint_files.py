"""A train-generator run's files given to generate / eval: checkpoints by any spelling, moved, missing
or copied out of their run, and the run's milestones and config.json after a continuation."""

import json
import shutil

import pytest
import torch

from softvq.checkpoint.pretrained import CheckpointError
from softvq.cli.main import main
from softvq.generation.checkpoint import load_generator
from softvq.generation.train import GeneratorTrainConfig, train_generator
from softvq.training.checkpointing import checkpoint_path
from tests.tiny_generation import TINY, tiny_latent_set


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, run): a tiny tokenizer, its latent set ``root/lat`` and a SiT run trained 4 steps with
    checkpoints at 2 and 4 and a milestone export at 2. Tests that change the run copy it first."""
    root = tmp_path_factory.mktemp("gen")
    tiny_latent_set(root)
    run = root / "run"
    train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(run), steps=4, export_at=[2], **TINY),
                    progress=False)
    return root, run


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_checkpoint_given_by_a_bare_relative_name_loads(made, monkeypatch, tmp_path, capsys):
    root, run = made
    final, _ = load_generator(run / "generator")
    monkeypatch.chdir(run / "checkpoints")
    for name in ("step-00000004.pt", "./step-00000004.pt"):  # were "a file that is not a generator checkpoint"
        assert same_weights(load_generator(name)[0], final)
    assert main(["generate", "step-00000004.pt", "--out", str(tmp_path / "s"), "--classes", "0", "--per-class", "1",
                 "--steps", "2", "--device", "cpu"]) == 0, capsys.readouterr().err


def old_run(run, folder, latents, out):
    """A copy of ``run`` in ``folder`` as train-generator wrote it before checkpoints held their meta:
    config.json records ``latents`` and ``out`` as given on the command line."""
    shutil.copytree(run, folder)
    config = json.loads((folder / "config.json").read_text())
    config["train"].update(latents=latents, out=out)
    (folder / "config.json").write_text(json.dumps(config))
    file = checkpoint_path(folder, 4)
    torch.save({k: v for k, v in torch.load(file, weights_only=True).items() if k not in ("meta", "model_config")}, file)
    return file


def test_an_old_checkpoint_finds_its_relative_latent_set_from_another_directory(made, monkeypatch, tmp_path):
    root, run = made
    meta = load_generator(run / "generator")[1]
    # trained in root as --latents lat --out old/run, loaded from elsewhere: was "not at lat any more"
    file = old_run(run, root / "old" / "run", "lat", "old/run")
    monkeypatch.chdir(tmp_path)
    assert load_generator(file)[1] == meta
    # trained in root/old as --latents ../lat --out run: found from the run's parent
    file = old_run(run, root / "old2" / "run", "../lat", "elsewhere/run")
    assert load_generator(file)[1] == meta
    # not found: the message says where it looked
    file = old_run(run, root / "old3" / "run", "gone", "old3/run")
    with pytest.raises(CheckpointError, match=rf"latent set its run was started on \('gone' in .*config.json\) is at none "
                                              rf"of {tmp_path}/gone, {root}/gone, {root}/old3/gone; put it back"):
        load_generator(file)


def test_new_runs_record_their_latent_set_absolute(made, monkeypatch, tmp_path):
    root, _ = made
    monkeypatch.chdir(root)
    train_generator(GeneratorTrainConfig(latents="lat", out=str(tmp_path / "r"), steps=1, **TINY), progress=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["latents"] == str(root / "lat")


def test_a_missing_checkpoint_names_what_its_run_holds(made, capsys):
    _, run = made
    assert main(["generate", str(checkpoint_path(run, 3)), "--out", "unused", "--device", "cpu"]) == 2
    err = capsys.readouterr().err  # was "no checkpoint folder at ... (and it is not a hub id like 'org/name')"
    assert f"no such checkpoint file {checkpoint_path(run, 3)}: train-generator keeps only the last " \
           f"--keep-checkpoints" in err
    assert f"its run {run} holds checkpoints/step-00000002.pt, checkpoints/step-00000004.pt and the generators " \
           f"generator-step-00000002, generator" in err


def test_a_checkpoint_copied_out_of_its_run_loads_on_its_own(made, tmp_path):
    _, run = made
    loose = tmp_path / "loose.pt"
    shutil.copy(checkpoint_path(run, 4), loose)
    model, meta = load_generator(loose)  # was "a file that is not a generator checkpoint"
    final, final_meta = load_generator(run / "generator")
    assert same_weights(model, final) and meta == final_meta
    # one from before checkpoints held their backbone config says what it needs
    state = torch.load(loose, weights_only=True)
    del state["model_config"]
    torch.save(state, loose)
    with pytest.raises(CheckpointError, match=r"loose.pt is a train-generator checkpoint outside its run folder, .*"
                                              r"put it back as RUN/checkpoints/step-00000004.pt of its run RUN"):
        load_generator(loose)
    torch.save({"format": "softvq-train", "config": {}, "model": {}, "ema": {}}, tmp_path / "tok.pt")
    with pytest.raises(CheckpointError, match="tok.pt is a checkpoint of a tokenizer training run, not of a generator"):
        load_generator(tmp_path / "tok.pt")
    (tmp_path / "other.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="other.pt is a file that is not a generator checkpoint"):
        load_generator(tmp_path / "other.pt")
    # weights and EMA without the step every train-generator checkpoint records: some other program's
    torch.save({"model": {}, "ema": {"shadow": {}}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is a file that is not a generator checkpoint"):
        load_generator(tmp_path / "other.pt")


def test_the_loaders_and_info_tell_a_generator_checkpoint_by_the_same_contents(made, tmp_path):
    """One test tells a generator checkpoint copied out of its run, for load_generator, info and the
    tokenizer loader's refusal alike: a softvq train checkpoint (which also holds model, ema and
    step), or weights without a step, is none."""
    from softvq.checkpoint.pretrained import _from_training_checkpoint
    from softvq.generation.checkpoint import holds_generator_checkpoint

    _, run = made
    state = torch.load(checkpoint_path(run, 4), weights_only=True)
    assert holds_generator_checkpoint(state)
    assert not holds_generator_checkpoint({k: v for k, v in state.items() if k != "step"})
    assert not holds_generator_checkpoint({**state, "format": "softvq-train"})
    assert not holds_generator_checkpoint([state])
    loose = tmp_path / "loose.pt"
    shutil.copy(checkpoint_path(run, 4), loose)
    with pytest.raises(CheckpointError, match="loose.pt is a checkpoint of a generator"):
        _from_training_checkpoint(loose)


def test_a_run_stopped_before_its_export_names_its_milestone_exports(made, tmp_path):
    _, run = made
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "generator")
    with pytest.raises(CheckpointError, match=rf"or pass its last checkpoint {stopped}/checkpoints/step-00000004.pt or "
                                              rf"one of its --export-at generators {stopped}/generator-step-00000002 "
                                              rf"in its place"):
        load_generator(stopped)


def test_generate_names_a_recorded_tokenizer_that_is_gone(made, tmp_path, capsys):
    _, run = made
    gen = tmp_path / "gen"
    shutil.copytree(run / "generator", gen)
    config = json.loads((gen / "config.json").read_text())
    config["meta"]["tokenizer"] = str(tmp_path / "gone")
    (gen / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(gen), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert f"{gen} records its latents' tokenizer as {tmp_path / 'gone'}, which does not load: no checkpoint folder " \
           f"at" in (err := capsys.readouterr().err)  # was the bare loader's "no checkpoint folder at ..." alone
    assert err.strip().endswith("pass --tokenizer SPEC with that tokenizer where it is now")


def test_export_at_the_step_a_run_is_at_exports_the_ema_it_loads(made, tmp_path, capsys, caplog):
    root, run = made
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "generator-step-00000002")
    capsys.readouterr()
    again = train_generator(GeneratorTrainConfig(latents=str(root / "lat"), out=str(copy), steps=4, export_at=[2, 4],
                                                 **TINY), progress=False)
    err = capsys.readouterr().err + caplog.text  # the run's lines and its warnings
    assert again["already_finished"] and "--export-at 4" not in err  # was "already at step 4, past it"
    assert same_weights(load_generator(copy / "generator-step-00000004")[0], load_generator(copy / "generator")[0])
    assert json.loads((copy / "generator-step-00000004" / "config.json").read_text())["step"] == 4
    # a step passed: its kept checkpoint is named
    assert f"--export-at 2: the run is already at step 4, past it, so it cannot be exported any more; sample it " \
           f"from its checkpoint with `softvq generate {checkpoint_path(copy, 2)}`" in err


def test_config_json_describes_a_continued_run(made, tmp_path):
    root, _ = made
    common = dict(latents=str(root / "lat"), out=str(tmp_path / "run"), **TINY)
    train_generator(GeneratorTrainConfig(steps=2, export_at=[1], **common), progress=False)
    train_generator(GeneratorTrainConfig(steps=4, export_at=[3], **common), progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["train"]["export_at"] == [1, 3]  # were 2 and [1]
    assert config["continued"] == [{"at_step": 2, "from_steps": 2, "to_steps": 4}]
    train_generator(GeneratorTrainConfig(steps=4, **common), progress=False)  # finished: nothing to add
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config


def test_generate_of_a_run_says_when_its_export_is_behind_its_checkpoints(made, tmp_path, capsys):
    """A run lengthened with --steps and stopped before its new end keeps the export of its old end:
    `generate RUN` samples that, so it says so and names the newer checkpoint."""
    _, run = made
    sample = ["--classes", "0", "--per-class", "1", "--steps", "2", "--device", "cpu"]
    assert main(["generate", str(run), "--out", str(tmp_path / "s"), *sample]) == 0
    assert "warning" not in capsys.readouterr().err  # the export is the run's last step
    lengthened = tmp_path / "lengthened"
    shutil.copytree(run, lengthened)
    shutil.copy(checkpoint_path(lengthened, 4), checkpoint_path(lengthened, 6))  # as a run stopped at step 6 leaves it
    assert main(["generate", str(lengthened), "--out", str(tmp_path / "t"), *sample]) == 0
    err = capsys.readouterr().err
    assert f"{lengthened}/generator is the EMA of step 4, but the run has trained to step 6" in err
    assert f"softvq generate {checkpoint_path(lengthened, 6)}" in err


def test_loading_a_generator_leaves_the_callers_random_stream_and_the_tokenizer_loader_points_to_it(made):
    """load_generator drew its throwaway initialisation from the global RNG (the tokenizer loaders
    fork it); Tokenizer.from_pretrained on a generator pointed to from_official."""
    from softvq import Tokenizer

    _, run = made
    torch.manual_seed(7)
    expected = torch.rand(3)
    for source in (run / "generator", run / "checkpoints" / "step-00000004.pt"):
        torch.manual_seed(7)
        load_generator(source)
        assert torch.equal(torch.rand(3), expected), source
    with pytest.raises(CheckpointError, match="it is a generator: load it with softvq.generation.checkpoint"):
        Tokenizer.from_pretrained(run / "generator")


def test_an_export_refuses_a_folder_of_another_kind_and_a_meta_of_another_generator(made, tmp_path):
    """Were written without a word: a generator over a tokenizer (which then no longer loaded), one
    into a latent set, and a meta of another objective, found only when sampling."""
    from softvq import Tokenizer
    from softvq.generation.checkpoint import GeneratorMeta, save_generator

    root, run = made
    model, meta = load_generator(run / "generator")
    with pytest.raises(FileExistsError, match=f"{root / 'tok'} holds a softvq-tokenizer checkpoint; writing a "
                                              f"softvq-generator checkpoint there would replace"):
        save_generator(model, meta, root / "tok")
    Tokenizer.from_pretrained(root / "tok")  # still there
    with pytest.raises(FileExistsError, match="holds a latent set"):
        save_generator(model, meta, root / "lat")
    unfinished = tmp_path / "unfinished"  # an interrupted pretokenize: shards and its progress file
    unfinished.mkdir()
    (unfinished / "progress.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds an interrupted pretokenize's latent set; writing a softvq-"):
        save_generator(model, meta, unfinished)
    assert sorted(p.name for p in unfinished.iterdir()) == ["progress.json"]
    with pytest.raises(FileExistsError, match="holds a softvq-generator checkpoint; writing a softvq-tokenizer"):
        Tokenizer.from_pretrained(root / "tok").save_pretrained(run / "generator")
    with pytest.raises(ValueError, match="the meta says objective 'dit' but the model is a 'sit' generator"):
        save_generator(model, GeneratorMeta(**{**meta.to_dict(), "objective": "dit"}), tmp_path / "g")
    with pytest.raises(TypeError, match="meta must be a GeneratorMeta, got dict"):
        save_generator(model, meta.to_dict(), tmp_path / "g")
    with pytest.raises(FileExistsError, match="holds a train-generator run; writing"):
        Tokenizer.from_pretrained(root / "tok").save_pretrained(run)  # its config.json is the run's record
    save_generator(model, meta, run / "generator")  # its own kind: written again, as a re-export does
