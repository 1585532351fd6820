"""bench/sft_pairs.py: who runs when, and how the pairs are read (the trials themselves are `make bench`'s)."""

import importlib.util
import sys

import pytest
from testlib import REPO

sys.path.insert(0, str(REPO))
spec = importlib.util.spec_from_file_location("sft_pairs", REPO / "bench" / "sft_pairs.py")
sft_pairs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sft_pairs)


def test_the_sides_take_turns_each_first_in_every_other_pair():
    assert sft_pairs.order(3) == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert sft_pairs.order(1) == ["ours", "peer"]


def test_the_reading_is_the_median_of_the_pair_ratios_not_the_ratio_of_medians():
    # the host's speed changed between pairs: the pairs read 1.1, 1.32, 0.8 (median 1.1),
    # while the sides' medians, taken at different host speeds, would read 330 / 250 = 1.32
    ours = [{"tokens_per_s": x} for x in (440.0, 330.0, 200.0)]
    peer = [{"tokens_per_s": x} for x in (400.0, 250.0, 250.0)]
    r = sft_pairs.reading({"ours": ours, "peer": peer})
    assert r["pair_ratios"] == pytest.approx([1.1, 1.32, 0.8])
    assert r["ratio"] == pytest.approx(1.1) and r["pairs"] == 3
    assert r["ours_median"] / r["peer_median"] == pytest.approx(1.32)  # what a ratio of medians would have read


def test_ours_runs_the_demo_with_only_sft_doing_work():
    from alignpipe.config import load_pipeline

    sets = dict(s.split("=", 1) for s in sft_pairs.SFT_ONLY)
    cfg = load_pipeline(REPO / "pipelines.yaml", "demo", sets)
    demo = load_pipeline(REPO / "pipelines.yaml", "demo", {})
    assert cfg.align.method == "none" and cfg.quantize.method == "none" and not cfg.register_.enabled
    assert not cfg.evaluate.compare_base and not cfg.evaluate.prompted_base.enabled and cfg.evaluate.limit == 1
    assert cfg.sft == demo.sft and cfg.data == demo.data  # the demo's own SFT: settings and data
