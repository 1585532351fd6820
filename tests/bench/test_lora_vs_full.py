"""bench/lora_vs_full.py: the peak RSS of a block is exact and counts nothing from before it."""

import importlib.util
import mmap

import pytest

from testlib import REPO

spec = importlib.util.spec_from_file_location("bench_lora_vs_full", REPO / "bench" / "lora_vs_full.py")
lora_vs_full = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lora_vs_full)

MB = 2**20


def _touch(n_mb: int) -> mmap.mmap:
    """n_mb of resident memory, mapped directly (malloc could keep freed memory and hand it back unmapped)."""
    block = mmap.mmap(-1, n_mb * MB)
    for i in range(0, len(block), mmap.PAGESIZE):  # fault every page in
        block[i] = 1
    return block


@pytest.mark.skipif(not lora_vs_full.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_counts_the_block_only():
    _touch(400).close()  # an earlier, larger peak: a lifetime peak would report it
    floor = lora_vs_full.current_rss_mb()
    with lora_vs_full.PeakRss() as peak:
        _touch(150).close()  # unmapped before the block ends: a peak, not a level
    assert 140 <= peak.peak_mb - floor < 250  # 150 MB, give or take the pages Python touched meanwhile
    assert lora_vs_full.vm_hwm_mb() >= peak.peak_mb
