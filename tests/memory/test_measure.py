"""Peak memory on CPU from the allocator's events: exact, repeatable, quiet."""

import os
import sys

import pytest
import torch

from revnet.memory.measure import peak_of

CPU = torch.device("cpu")
MiB = 2**20


def two_mebibytes_at_once() -> None:
    a = torch.ones(MiB // 4)  # 1 MiB of float32
    b = torch.ones(MiB // 4)
    del a, b
    torch.ones(MiB // 8)  # 0.5 MiB after they are gone: not a new peak


def test_the_allocators_peak_is_exact_even_on_a_fragmented_heap(capfd):
    assert peak_of(two_mebibytes_at_once, CPU) == 2 * MiB
    gen = torch.Generator().manual_seed(0)
    kept = [torch.ones(int(n)) for n in torch.randint(1, 2_000_000, (400,), generator=gen)][::20]
    assert kept and [peak_of(two_mebibytes_at_once, CPU) for _ in range(3)] == [2 * MiB] * 3
    assert "USDT" not in capfd.readouterr().err  # kineto's start/stop lines are left out


def test_a_step_measures_the_same_every_time():
    import revnet

    torch.manual_seed(0)
    model = revnet.create_model("revnet38")
    x = torch.randn(16, 3, 16, 16)

    def step() -> None:
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    peaks = [peak_of(step, CPU) for _ in range(3)]
    assert peaks[0] > 0 and peaks == peaks[:1] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory from /proc")
def test_under_a_running_profiler_it_falls_back_to_resident_memory_with_a_warning():
    with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
          pytest.warns(UserWarning, match="profiler is running")):
        peak = peak_of(two_mebibytes_at_once, CPU)
    assert peak >= 0


def test_an_unknown_source_is_an_error():
    with pytest.raises(ValueError, match="'allocator' or 'resident'"):
        peak_of(two_mebibytes_at_once, CPU, source="rss")


@pytest.mark.skipif(not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="glibc's malloc thresholds, changed at run time")
def test_kept_memory_stays_with_the_process_and_outlives_a_measurement():
    """keep_freed_memory(): a freed 48 MiB block (above glibc's largest dynamic mmap threshold,
    so by default mapped on its own and unmapped when freed) stays in the process for the next
    tensor, also after a resident-set measurement switched the thresholds for its duration."""
    import revnet.memory.measure as peak

    def freed_block_stays() -> bool:
        block = torch.ones(48 * MiB // 4)  # 48 MiB, touched
        held = peak.proc_status("VmRSS")
        del block
        return held - peak.proc_status("VmRSS") < 24 * MiB

    saved = peak._after
    try:
        assert peak.keep_freed_memory()  # (a fresh process unmaps the block: glibc's default)
        assert freed_block_stays()
        peak_of(two_mebibytes_at_once, CPU, source="resident")  # 64 KiB thresholds while it measures
        assert freed_block_stays()
    finally:
        peak._after = saved
        lib = peak._libc()
        for param, value in saved:
            lib.mallopt(param, value)
        peak.trim_heap()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_window_peaks_split_the_peak_at_the_marks(device):
    from revnet.memory.measure import window_peaks_of

    def work(mark):
        a = torch.ones(1 << 20, device=device)  # 4 MiB
        mark("b")
        b = torch.ones(2 << 20, device=device)  # 8 MiB more: 12
        del a  # 8
        mark("c")
        c = torch.ones(1 << 18, device=device)  # 1 MiB more: 9
        del b, c

    assert window_peaks_of(work, torch.device(device)) == [("", 4 << 20), ("b", 12 << 20), ("c", 9 << 20)]
