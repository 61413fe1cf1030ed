"""``softvq encode`` / ``softvq decode``: a folder of images -> named latents -> named images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from interrupting import interrupt_at_call

from softvq import Tokenizer
from softvq.cli.decode import output_names
from softvq.cli.encode import read_latents
from softvq.cli.main import main
from softvq.data.images import read_image, to_pil


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "sub/b.jpg", "sub/c.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    return folder, names


def test_encode_then_decode_round_trip(tmp_path, capsys):
    torch.manual_seed(1)
    model = Tokenizer.from_preset("softvq-tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    folder, names = _folder(tmp_path)
    latents_file = tmp_path / "z.safetensors"

    assert main(["encode", str(folder), "--model", str(ckpt), "--out", str(latents_file), "--batch-size", "2"]) == 0
    data = read_latents(latents_file)
    assert data.names == names
    assert data.latents.shape == (3, 16, 8) and data.latents.dtype == torch.float32
    with safe_open(str(latents_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == str(ckpt) and meta["image_size"] == "64" and json.loads(meta["names"]) == names

    images = torch.stack([read_image(folder / n, 64) for n in names])
    with torch.inference_mode():
        expected = model.encode(images).latents
    torch.testing.assert_close(data.latents, expected, atol=1e-5, rtol=0)

    # decode with the model recorded in the file (no --model)
    out = tmp_path / "decoded"
    assert main(["decode", str(latents_file), "--out", str(out)]) == 0
    with torch.inference_mode():
        decoded = model.decode(data.latents)
    for name, image in zip(["a.png", "sub/b.png", "sub/c.png"], decoded):
        written = np.asarray(Image.open(out / name))
        assert np.array_equal(written, np.asarray(to_pil(image))), name
    assert "decoded 3 image(s)" in capsys.readouterr().out

    # the latents file is work: a second encode onto it, or onto a folder, is refused before encoding
    before = latents_file.read_bytes()
    assert main(["encode", str(folder), "--model", str(ckpt), "--out", str(latents_file)]) == 2
    assert "z.safetensors already exists; choose another --out" in capsys.readouterr().err
    assert latents_file.read_bytes() == before
    assert main(["encode", str(folder), "--model", str(ckpt), "--out", str(out)]) == 2
    assert f"--out {out} is a folder; name the latents file to write" in capsys.readouterr().err


def test_a_relative_model_folder_is_recorded_so_decode_finds_it_from_elsewhere(tmp_path, capsys, monkeypatch):
    Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "ckpt")
    folder, names = _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["encode", "imgs", "--model", "ckpt", "--out", "z.safetensors"]) == 0
    with safe_open("z.safetensors", framework="pt") as f:
        assert f.metadata()["model"] == str((tmp_path / "ckpt").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["decode", "../z.safetensors", "--out", "decoded"]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "decoded").rglob("*.png")) == ["a.png", "b.png", "c.png"]


def test_a_preset_seed_is_recorded_so_decode_rebuilds_the_same_weights(tmp_path, capsys):
    folder, names = _folder(tmp_path)
    latents_file = str(tmp_path / "z.safetensors")
    assert main(["encode", str(folder), "--model", "softvq-tiny", "--seed", "7", "--out", latents_file]) == 0
    assert main(["decode", latents_file, "--out", str(tmp_path / "a")]) == 0
    torch.manual_seed(7)
    model = Tokenizer.from_preset("softvq-tiny").eval()
    with torch.inference_mode():
        expected = to_pil(model.decode(read_latents(latents_file).latents[:1])[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "a.png")), np.asarray(expected))
    # decoding with other weights than encode's is allowed, with a warning; the file records the
    # weights' sha1, so the same weights elsewhere pass, and other weights under encode's path do not
    other = Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["decode", latents_file, "--model", str(other), "--out", str(tmp_path / "b")]) == 0
    assert (f"{latents_file} was encoded by other weights than {other}'s (encode had softvq-tiny; trained further "
            f"since, or another model)") in capsys.readouterr().err
    model.save_pretrained(tmp_path / "same")  # seed 7's weights, saved: was "encoded with softvq-tiny; decoding with"
    assert main(["decode", latents_file, "--model", str(tmp_path / "same"), "--out", str(tmp_path / "c")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["encode", str(folder), "--model", str(tmp_path / "same"),
                 "--out", str(tmp_path / "y.safetensors")]) == 0
    Tokenizer.from_preset("softvq-tiny").save_pretrained(tmp_path / "same")  # trained further, as it were
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "y.safetensors"), "--out", str(tmp_path / "d")]) == 0  # was: no word
    assert "was encoded by other weights than" in capsys.readouterr().err


def test_output_names_keep_folders_and_avoid_collisions():
    assert output_names(["x/a.jpg", "b.png"]) == ["x/a.png", "b.png"]
    assert output_names(["a.jpg", "a.png", "c.webp"]) == ["a.jpg.png", "a.png.png", "c.png"]
    # a kept suffix can meet an input of that very name: each input still gets its own file
    assert output_names(["b.jpg", "b.jpg.png", "b.png"]) == ["b.jpg.png", "b.jpg-1.png", "b.png.png"]
    from pathlib import Path

    from softvq.cli.reconstruct import unique_stems
    assert unique_stems([Path("a-1.png"), Path("a.jpg"), Path("a.png")]) == ["a-1", "a", "a-2"]


def test_encode_in_bf16_records_it_and_stays_close_to_float32(tmp_path, capsys, monkeypatch):
    torch.manual_seed(1)
    model = Tokenizer.from_preset("softvq-tiny").eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    folder, names = _folder(tmp_path)
    # A CPU without bf16 matrix instructions gets a warning that bf16 may be slower, not an error.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert main(["encode", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "z.safetensors"),
                 "--precision", "bf16"]) == 0
    assert "no bf16 matrix instructions" in capsys.readouterr().err
    data = read_latents(tmp_path / "z.safetensors")
    assert data.meta["compute_precision"] == "bf16" and data.latents.dtype == torch.float32

    images = torch.stack([read_image(folder / n, 64) for n in names])
    with torch.inference_mode():
        exact = model.encode_latents(images)
        mixed = model.enable_autocast("bf16").encode_latents(images)
    torch.testing.assert_close(data.latents, mixed, atol=1e-5, rtol=0)
    assert not torch.allclose(data.latents, exact, atol=1e-5, rtol=0)  # it did run in bf16
    capsys.readouterr()  # the Python call above warned too, on this emulating CPU

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert main(["encode", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "y.safetensors"),
                 "--precision", "bf16"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_interrupted_decode_continues_and_another_decode_is_refused(tmp_path, capsys, monkeypatch):
    folder, names = _folder(tmp_path)
    latents = str(tmp_path / "z.safetensors")
    assert main(["encode", str(folder), "--model", "softvq-tiny", "--out", latents]) == 0
    assert main(["decode", latents, "--out", str(tmp_path / "straight"), "--batch-size", "1"]) == 0
    interrupt_at_call(monkeypatch, Tokenizer, "decode", 2)  # at the second batch
    out = tmp_path / "cut"
    assert main(["decode", latents, "--out", str(out), "--batch-size", "1"]) == 130
    assert "run the same command again to decode the rest" in capsys.readouterr().err
    assert [p.name for p in out.rglob("*.png")] == ["a.png"]
    monkeypatch.undo()
    (out / "sub").mkdir(exist_ok=True)
    (out / "sub" / ".b.png.x1y2z3.tmp").write_bytes(b"half")  # what a SIGKILL mid-write leaves
    # the same images encoded again, elsewhere: the same decode, though safetensors writes the
    # metadata in another order each time (was refused: "latents_sha1 '7436…' -> '5543…'")
    moved = str(tmp_path / "moved.safetensors")
    for _ in range(5):  # the order is random: another file, almost always at the first try
        Path(moved).unlink(missing_ok=True)
        assert main(["encode", str(folder), "--model", "softvq-tiny", "--out", moved]) == 0
        if Path(moved).read_bytes() != Path(latents).read_bytes():
            break
    assert Path(moved).read_bytes() != Path(latents).read_bytes()
    Path(latents).unlink()
    record = json.loads((out / "decode.json").read_text())  # as an older softvq recorded it: the file's sha1
    record["latents_sha1"] = hashlib.sha1(Path(moved).read_bytes()).hexdigest()
    (out / "decode.json").write_text(json.dumps(record))
    # was: "a.png already exists; choose another --out"
    assert main(["decode", moved, "--out", str(out), "--batch-size", "1"]) == 0
    assert "(1 already there from an earlier run)" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp"))
    latents = moved
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    # a decode with other options would mix two decodes in one folder
    assert main(["decode", latents, "--out", str(out), "--batch-size", "2", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds a decode of other latents or options (" in err and "seed 0 -> 3" in err
    assert "run that decode again to continue it, or choose another --out" in err
    # the batch size alone changes nothing a deterministic decoder makes (was: refused, "batch_size 1 -> 2")
    assert "batch_size" not in err
    assert main(["decode", latents, "--out", str(out), "--batch-size", "2"]) == 0
    assert "(3 already there from an earlier run)" in capsys.readouterr().out
    # other latents whose images have other names: refused too (was: taken over, the first decode's
    # record replaced, so that it could no longer continue)
    others = tmp_path / "others"
    others.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(others / "zzz.png")
    assert main(["encode", str(others), "--model", "softvq-tiny", "--out", str(tmp_path / "o.safetensors")]) == 0
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "o.safetensors"), "--out", str(out), "--batch-size", "1"]) == 2
    assert "holds a decode of other latents or options (latents_sha1 " in capsys.readouterr().err
    assert not (out / "zzz.png").exists()
    assert main(["decode", latents, "--out", str(out), "--batch-size", "1"]) == 0  # the first still continues
    (tmp_path / "file").write_text("x")
    assert main(["decode", latents, "--out", str(tmp_path / "file")]) == 2  # was: [Errno 20] Not a directory
    assert f"--out {tmp_path / 'file'} is a file; decode writes a folder of images" in capsys.readouterr().err


@pytest.mark.parametrize("tensor, metadata, named", [
    (torch.zeros(2, 16, 8, dtype=torch.int32), {},
     "'latents' is a (2, 16, 8) int32 tensor; softvq encode writes (N, L, D) floats"),
    (torch.zeros(2, 16, 8), {"names": "[1, 2]"}, "its 'names' metadata is not a JSON list of file names"),
    (torch.zeros(2, 16, 8), {"names": "a.png,b.png"}, "its 'names' metadata is not a JSON list of file names"),
    (torch.zeros(2, 16, 8), {"names": '["a.png", ""]'}, "its 'names' metadata is not a JSON list of file names"),
    (torch.zeros(2, 16, 8), {"image_size": "abc"}, "its 'image_size' metadata 'abc' is not a size in pixels"),
])
def test_a_hand_edited_latents_file_is_named_not_a_traceback(tmp_path, capsys, tensor, metadata, named):
    """Was: TypeError / ValueError tracebacks, or a JSON error that named neither the file nor the field."""
    from safetensors.torch import save_file

    path = tmp_path / "z.safetensors"
    save_file({"latents": tensor}, str(path), metadata={"format": "softvq-latents", "model": "softvq-tiny", **metadata})
    assert main(["decode", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"softvq decode: error: {path}: {named}" in err
