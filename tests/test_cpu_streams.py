"""CPU inference split into one piece of the batch per core (softvq.cpu_streams): the same numbers
as the whole batch, on threads of their own, and never where the split would show."""

import multiprocessing
import os
import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import softvq
from softvq.config import BottleneckConfig, TokenizerConfig, ViTConfig
from softvq.cpu_streams import SWITCH_VARIABLE, pieces_for, split_over_cores, whole_batch


@pytest.fixture
def threads():
    """Set the caller's thread count for a test (the split follows it, on any number of cores)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def tiny(kind="softvq", noise_dim=0) -> softvq.Tokenizer:
    torch.manual_seed(0)
    return softvq.Tokenizer(TokenizerConfig(
        image_size=32, patch_size=8, num_tokens=6, encoder=ViTConfig(32, 2, 2), decoder=ViTConfig(32, 2, 2),
        bottleneck=BottleneckConfig(kind=kind, latent_dim=4, codebook_size=16), decoder_noise_dim=noise_dim,
    )).eval()


def calls_of(module: torch.nn.Module) -> list[tuple[int, int, int]]:
    """(thread, its torch thread count, batch) of every forward of ``module`` from now on."""
    seen: list[tuple[int, int, int]] = []
    module.register_forward_hook(lambda m, args, out: seen.append(
        (threading.get_ident(), torch.get_num_threads(), args[0].shape[0])))
    return seen


@pytest.mark.parametrize("kind", ["softvq", "vq", "kl"])
def test_the_pieces_give_the_whole_batchs_numbers(threads, kind):
    threads(2)
    model = tiny(kind)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        split = model.encode(images), model.encode_latents(images)
        decoded = model.decode(split[0].latents)
        with whole_batch():
            whole = model.encode(images), model.encode_latents(images)
            whole_decoded = model.decode(whole[0].latents)
    torch.testing.assert_close(split[1], whole[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(split[0].latents, whole[0].latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded, whole_decoded, rtol=0, atol=1e-6)
    for name, loss in whole[0].losses.items():  # batch statistics (SoftVQ's regulariser) over all five images
        torch.testing.assert_close(split[0].losses[name], loss, rtol=0, atol=1e-6)


def test_each_piece_runs_on_a_thread_of_its_own_with_one_compute_thread(threads):
    threads(2)
    model = tiny()
    encoder, decoder = calls_of(model.encoder), calls_of(model.decoder)
    with torch.inference_mode():
        model.decode(model.encode_latents(torch.rand(5, 3, 32, 32) * 2 - 1))
    for seen in (encoder, decoder):
        assert sorted(batch for _, _, batch in seen) == [2, 3]
        assert {count for _, count, _ in seen} == {1}
        assert threading.get_ident() not in {thread for thread, _, _ in seen}  # on the pool's threads
    assert torch.get_num_threads() == 2  # the caller's count is its own
    fresh = []
    worker = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert fresh == [2]  # and threads started later begin from it, not from a piece's


def test_the_threads_are_shared_out_over_the_pieces(threads):
    model = tiny()
    seen = calls_of(model.encoder)
    threads(4)
    with torch.no_grad():  # no_grad as well as inference_mode
        model.encode_latents(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert sorted((count, batch) for _, count, batch in seen) == [(2, 1), (2, 1)]  # more threads than images
        seen.clear()
        model.encode_latents(torch.rand(5, 3, 32, 32) * 2 - 1)
        assert sorted((count, batch) for _, count, batch in seen) == [(1, 1), (1, 1), (1, 1), (1, 2)]  # a core each


def test_no_split_where_it_would_show(threads, monkeypatch):
    threads(2)
    model = tiny()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = calls_of(model.encoder)
    caller = threading.get_ident()

    def whole_on_caller(run) -> None:
        seen.clear()
        run()
        assert [(thread, batch) for thread, _, batch in seen] == [(caller, 4)]

    whole_on_caller(lambda: model.encode_latents(images))  # autograd on
    with torch.inference_mode():
        with whole_batch():
            whole_on_caller(lambda: model.encode_latents(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is per thread: the pieces would miss it
            whole_on_caller(lambda: model.encode_latents(images))
        monkeypatch.setenv(SWITCH_VARIABLE, "0")
        whole_on_caller(lambda: model.encode_latents(images))
        monkeypatch.delenv(SWITCH_VARIABLE)
        threads(1)
        whole_on_caller(lambda: model.encode_latents(images))
        threads(2)
        assert pieces_for(images[:1]) == 1 and pieces_for(images) == 2
    # FlopCounterMode counts the thread it was entered on: split, it would count nothing
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        whole_on_caller(lambda: model.encode_latents(images))
    with torch.inference_mode(), whole_batch(), FlopCounterMode(display=False) as reference:
        model.encode_latents(images)
    assert counter.get_total_flops() == reference.get_total_flops() > 0


def test_an_error_in_a_piece_reaches_the_caller(threads):
    threads(2)

    def refuse_odd(part: torch.Tensor) -> torch.Tensor:
        if part[0, 0] % 2:
            raise ValueError(f"odd piece starting at {int(part[0, 0])}")
        return part

    with torch.inference_mode(), pytest.raises(ValueError, match="odd piece starting at 3"):
        split_over_cores(refuse_odd, torch.arange(6.0).reshape(6, 1))


def _split_in_child(queue) -> None:
    threads_seen: set[int] = set()

    def double(part: torch.Tensor) -> torch.Tensor:
        threads_seen.add(threading.get_ident())
        return part * 2

    with torch.inference_mode():
        out = split_over_cores(double, torch.arange(6.0).reshape(6, 1))
    queue.put((out.flatten().tolist(), threading.get_ident() in threads_seen))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_splits_with_threads_of_its_own(threads):
    """A process forked after its parent split a batch (a DataLoader worker) has none of the
    parent's pool threads: splitting there must start its own, not wait on those forever."""
    threads(2)
    with torch.inference_mode():
        split_over_cores(lambda part: part * 2, torch.arange(6.0).reshape(6, 1))  # the parent's pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's split never returned")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == ([0.0, 2.0, 4.0, 6.0, 8.0, 10.0], False)  # on the child's pool threads
