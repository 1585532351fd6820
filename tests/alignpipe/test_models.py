from alignpipe.models import EAGER_MAX_TOKENS, training_attention


def test_auto_attention_is_eager_only_on_cpu_for_short_rows():
    assert training_attention("auto", on_gpu=False, longest=EAGER_MAX_TOKENS) == "eager"
    assert training_attention("auto", on_gpu=False, longest=EAGER_MAX_TOKENS + 1) == "sdpa"  # scores grow as len²
    assert training_attention("auto", on_gpu=True, longest=80) == "sdpa"  # fused GPU kernels
    assert training_attention("sdpa", on_gpu=False, longest=80) == "sdpa"  # an explicit choice wins
    assert training_attention("eager", on_gpu=True, longest=4096) == "eager"
