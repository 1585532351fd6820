"""The README's benchmark table, rendered from bench/results.json alone (one sitting: one host, one date).

ROWS declares every row: its target, the results.json keys it reads (dotted paths), how those keys give the reading
and the verdict, and its host class (bench/PROTOCOL.md). A row whose keys the sitting lacks reads "not measured in
this sitting", never an older value. `make bench` (bench/run.py) splices `render`'s table between the README's
bench markers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOT_MEASURED = "not measured in this sitting"
HEADER = "| target | reading | met? | host class | date |\n|---|---|---|---|---|"
# exact match is a whole number of rows over 400: 0.8525 - 0.8625 must count as -0.01, not below it
EPS = 1e-9
# What every row's date and host class cells read: the sitting's date, and the CPU's model name (optional: sittings
# before bench/run.py recorded it name no CPU, and their host class is shown without one).
META_KEYS = ("date", "cpu")
OPTIONAL_META_KEYS = ("cpu",)
CPU_FAMILIES = ("EPYC", "Xeon", "Ryzen", "Core", "Graviton", "Neoverse")


class Reader:
    """results.json seen through a row's declared keys: reading any other key is a bug in the row."""

    def __init__(self, results: dict, keys: tuple[str, ...]):
        self.results, self.keys = results, keys

    def __call__(self, key: str) -> Any:
        if key not in self.keys:
            raise KeyError(f"{key!r} is read but not declared in the row's keys {self.keys}")
        return lookup(self.results, key)


ABSENT = object()


def lookup(results: dict, key: str) -> Any:
    """The value at a dotted path (`demo_metrics.aligned.exact_match`), or ABSENT."""
    node: Any = results
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


@dataclass(frozen=True)
class Row:
    target: str                                  # what is measured and its target, as the README shows it
    keys: tuple[str, ...]                        # every results.json path `reading` and `met` read
    reading: Callable[[Reader], str]
    met: Callable[[Reader], bool] | None = None  # None: reported as information, no verdict
    host: str = "bf16"                           # bf16 (native) | AVX2/fp32 (emulated) | one GPU | — (any)
    optional: bool = False                       # keys `make bench` does not write yet (its script is run by hand)


def minus(text: str) -> str:
    """The README's minus sign."""
    return text.replace("-", "−")


def signed(x: float) -> str:
    return minus(f"{x:+.3f}")


def _em(label: str) -> str:
    return f"demo_metrics.{label}.exact_match"


AL, SFT, BASE, QZ, PB = (_em(label) for label in ("aligned", "sft", "base", "quantized", "prompted_base"))
PREF, SFT_PREF = "demo_metrics.aligned.preference_accuracy", "demo_metrics.sft.preference_accuracy"
RAY, INPROC = "sft_ray_trials", "sft_inprocess_trials"
RAY_TPS, TRL_TPS, COMPETENT_TPS = ("sft_tokens_per_s_ray", "sft_tokens_per_s_trl_defaults",
                                   "sft_tokens_per_s_trl_competent")
WALL, TRL_WALL, COMPETENT_WALL = "demo_wall_s", "plain_trl_wall_s", "plain_trl_competent_wall_s"
PREPARE, DEMO_TPS = "demo_stage_s.prepare", "any_cpu.native.sft.tokens_per_s"
AVX2_TPS, AVX2_PEER_TPS = "any_cpu.avx2.sft.tokens_per_s", "plain_trl_competent_avx2.sft_tokens_per_s"
PAIRS = ("sft_pairs.ratio", "sft_pairs.pairs", "sft_pairs.ours_median", "sft_pairs.peer_median")
K_OFF, K_AUTO = "sft_kernels_off_trials", "sft_kernels_auto_trials"
QS = "quantized_sizes."
RM_ACC, R_START, R_END = ("rlhf_train.reward_model/accuracy", "rlhf_train.policy/reward_start",
                          "rlhf_train.policy/reward_end")
INT8, FP32 = "int8_tokens_per_s_bs16", "fp32_tokens_per_s_bs16"
LORA_RSS, AMP_RSS = "lora_vs_full.lora.peak_rss_mb", "lora_vs_full.full-amp.peak_rss_mb"
LORA_UTIL, FULL_UTIL = "lora_vs_full.lora.utilisation", "lora_vs_full.full.utilisation"
MATMUL_BF16 = "matmul_flops_per_s.bfloat16"  # the host's own peak: the row does not compare across CPUs
PIPES, PROMOS = "shared_stack.pipelines.", "shared_stack.promotions."


def ray_over_inprocess(r: dict) -> float:
    """The Ray ÷ in-process reading: the median of the per-pair ratios of the interleaved trials.

    Each pair runs back to back (A B B A …), so its ratio is taken at one host speed; the host's speed drifts
    within minutes, and the ratio of the two sides' medians mixes trials from different speeds (bench/PROTOCOL.md)."""
    return statistics.median(a / b for a, b in zip(r[RAY], r[INPROC]))


def _ray(v: Reader) -> float:
    return ray_over_inprocess({RAY: v(RAY), INPROC: v(INPROC)})


def _pairs(v: Reader) -> int:
    return len(v(RAY))


def _work(v: Reader) -> float:
    """The demo's wall without its `prepare` stage (the one-off conversion of the embedded model, which the plain
    TRL scripts do not do)."""
    return v(WALL) - v(PREPARE)


def _kernels_off(v: Reader) -> float:
    return statistics.median(a / b for a, b in zip(v(K_OFF), v(K_AUTO)))


def _fresh(host: str) -> Callable[[Reader], str]:
    key = f"any_cpu.{host}.wall_s"
    return lambda v: f"{v(key) / 60:.1f} min ({v(key):.0f} s)"


def _serving(host: str) -> Callable[[Reader], str]:
    def reading(v: Reader) -> str:
        figures = v(f"any_cpu.{host}.serving.figures")
        names = "; ".join(f"{'int8' if k == 'quantized' else k} {x:.0f} ms" for k, x in figures.items())
        return f"{v(f'any_cpu.{host}.serving.registered_vs_best'):.2f} ({names})"
    return reading


def _validate_1m(v: Reader) -> dict:
    return next(x for x in v("validate_scale") if x["rows"] == 1_000_000)


def _validate_200k(v: Reader) -> dict:
    return next(x for x in v("validate_scale") if x["rows"] == 200_000)


def _validate_met(v: Reader) -> bool:
    big, mid = _validate_1m(v), _validate_200k(v)
    return (big["seconds"] <= 120 and big["peak_rss_largest_gib"] <= 2 and big["peak_rss_sum_gib"] <= 3
            and mid["rows_per_s"] >= 7200)


def _validate(v: Reader) -> str:
    big, mid = _validate_1m(v), _validate_200k(v)
    return (f"{big['seconds']:.0f} s, {big['peak_rss_largest_gib']:.2f} / {big['peak_rss_sum_gib']:.2f} GiB, "
            f"{mid['rows_per_s']:,} rows/s")


ROWS: tuple[Row, ...] = (
    Row("Tuned (aligned) exact match, held-out ≥ 0.85", (AL, SFT),
        lambda v: f"{v(AL):.3f} (SFT {v(SFT):.3f})", lambda v: v(AL) >= 0.85),
    Row("Tuned − base exact match ≥ +0.40", (AL, BASE),
        lambda v: f"{signed(v(AL) - v(BASE))} (base {v(BASE):.3f}: not told the format)",
        lambda v: v(AL) - v(BASE) >= 0.40 - EPS),
    Row("Tuned − prompted-base exact match ≥ 0.30", (AL, PB),
        lambda v: f"{signed(v(AL) - v(PB))} (prompted base {v(PB):.3f})", lambda v: v(AL) - v(PB) >= 0.30 - EPS,
        optional=True),
    Row("SFT tokens/s, Ray Train ÷ in-process (information; its target is retired)", (RAY, INPROC),
        lambda v: f"{_ray(v):.3f} (median of {_pairs(v)} interleaved pairs)"),
    Row("SFT tokens/s, ours ÷ TRL with its defaults ≥ 1.50", (RAY_TPS, TRL_TPS),
        lambda v: f"{v(RAY_TPS):.0f} / {v(TRL_TPS):.0f} = {v(RAY_TPS) / v(TRL_TPS):.2f}",
        lambda v: v(RAY_TPS) / v(TRL_TPS) >= 1.50),
    Row("SFT tokens/s, ours ÷ plain TRL with competent settings ≥ 1.2", (DEMO_TPS, COMPETENT_TPS),
        lambda v: f"{v(DEMO_TPS):.0f} / {v(COMPETENT_TPS):.0f} = {v(DEMO_TPS) / v(COMPETENT_TPS):.2f}",
        lambda v: v(DEMO_TPS) / v(COMPETENT_TPS) >= 1.2, optional=True),
    Row("The same, median of pairs taken in turns ≥ 1.2", PAIRS,
        lambda v: f"{v(PAIRS[0]):.2f} ({v(PAIRS[1])} pairs; medians {v(PAIRS[2]):.0f} / {v(PAIRS[3]):.0f})",
        lambda v: v(PAIRS[0]) >= 1.2, optional=True),
    Row("SFT tokens/s, ours ÷ plain TRL with competent settings (information)",
        (AVX2_TPS, AVX2_PEER_TPS),
        lambda v: f"{v(AVX2_TPS):.0f} / {v(AVX2_PEER_TPS):.0f} = {v(AVX2_TPS) / v(AVX2_PEER_TPS):.2f}",
        host="AVX2/fp32", optional=True),
    Row("SFT tokens/s, `compute.kernels: off` ÷ `auto` (information)",
        (K_OFF, K_AUTO), lambda v: f"{_kernels_off(v):.3f} (median of {len(v(K_OFF))} interleaved pairs)",
        optional=True),
    Row("Demo wall ÷ plain TRL script (TRL defaults, same work) ≤ 1.10", (WALL, PREPARE, TRL_WALL),
        lambda v: f"{_work(v):.0f} s / {v(TRL_WALL):.0f} s = {_work(v) / v(TRL_WALL):.2f}",
        lambda v: _work(v) / v(TRL_WALL) <= 1.10),
    Row("Demo wall ÷ plain TRL with competent settings ≤ 1.10", (WALL, PREPARE, COMPETENT_WALL),
        lambda v: f"{_work(v):.0f} s / {v(COMPETENT_WALL):.0f} s = {_work(v) / v(COMPETENT_WALL):.2f}",
        lambda v: _work(v) / v(COMPETENT_WALL) <= 1.10, optional=True),
    Row("`make demo` after the install, fresh workdir ≤ 10 min", ("any_cpu.native.wall_s",),
        _fresh("native"), lambda v: v("any_cpu.native.wall_s") <= 600, optional=True),
    Row("`make demo` after the install, fresh workdir ≤ 15 min", ("any_cpu.avx2.wall_s",),
        _fresh("avx2"), lambda v: v("any_cpu.avx2.wall_s") <= 900, host="AVX2/fp32", optional=True),
    Row("Aligned held-out preference accuracy ≥ 0.95 and ≥ SFT", (PREF, SFT_PREF),
        lambda v: f"{v(PREF):.3f} (SFT {v(SFT_PREF):.3f})", lambda v: v(PREF) >= 0.95 and v(PREF) >= v(SFT_PREF)),
    Row("Aligned reward margin vs the SFT reference > 0", ("demo_metrics.aligned.reward_margin",),
        lambda v: signed(v("demo_metrics.aligned.reward_margin")),
        lambda v: v("demo_metrics.aligned.reward_margin") > 0),
    Row("Aligned − SFT exact match ≥ −0.01", (AL, SFT),
        lambda v: signed(v(AL) - v(SFT)), lambda v: v(AL) - v(SFT) >= -0.01 - EPS),
    Row("RLHF reward model held-out accuracy ≥ 0.90", (RM_ACC,),
        lambda v: f"{v(RM_ACC):.3f}", lambda v: v(RM_ACC) >= 0.90),
    Row("RLHF policy mean reward, end ≥ start", (R_START, R_END),
        lambda v: minus(f"{v(R_END):.3f} vs {v(R_START):.3f} (one seed)"), lambda v: v(R_END) >= v(R_START)),
    Row("RLHF from a 12-step SFT, 3 seeds, one reward model: every end reward above every start; exact match gain > 0",
        ("rlhf_evidence.verdict.every_end_above_every_start", "rlhf_evidence.verdict.exact_match_gain_mean"),
        lambda v: (f"{'yes' if v('rlhf_evidence.verdict.every_end_above_every_start') else 'no'}; "
                   + minus(f"{v('rlhf_evidence.verdict.exact_match_gain_mean'):+.3f}")),
        lambda v: bool(v("rlhf_evidence.verdict.every_end_above_every_start"))
        and v("rlhf_evidence.verdict.exact_match_gain_mean") > 0, optional=True),
    Row("int8 linear layers ÷ fp32 bytes ≤ 0.30", (QS + "linear_bytes", QS + "linear_fp32_bytes"),
        lambda v: f"{v(QS + 'linear_bytes') / v(QS + 'linear_fp32_bytes'):.3f}",
        lambda v: v(QS + "linear_bytes") / v(QS + "linear_fp32_bytes") <= 0.30),
    Row("int8 model on disk ÷ fp32 ≤ 0.45", (QS + "size_bytes", QS + "fp32_size_bytes", QS + "embedding_bytes"),
        lambda v: f"{v(QS + 'size_bytes') / v(QS + 'fp32_size_bytes'):.3f} (fp32 embedding: "
                  f"{100 * v(QS + 'embedding_bytes') / v(QS + 'size_bytes'):.0f} % of it)",
        lambda v: v(QS + "size_bytes") / v(QS + "fp32_size_bytes") <= 0.45),
    Row("int8 ÷ fp32 decoding tokens/s, batch 16 ≥ 1.30", (INT8, FP32),
        lambda v: f"{v(INT8):.1f} / {v(FP32):.1f} = {v(INT8) / v(FP32):.2f}", lambda v: v(INT8) / v(FP32) >= 1.30),
    # bench/int8_cpu.py under the AVX2 caps (bench/PROTOCOL.md, issue 28): `make bench` does not run it yet
    Row("int8 ÷ fp32 decoding tokens/s, batch 16 ≥ 1.0",
        ("int8_avx2.ratio", "int8_avx2.pairs", "int8_avx2.int8_tokens_per_s", "int8_avx2.fp32_tokens_per_s"),
        lambda v: f"{v('int8_avx2.ratio'):.2f} (median of {v('int8_avx2.pairs')} pairs; "
                  f"{v('int8_avx2.int8_tokens_per_s'):.1f} / {v('int8_avx2.fp32_tokens_per_s'):.1f})",
        lambda v: v("int8_avx2.ratio") >= 1.0, host="AVX2/fp32", optional=True),
    Row("int8 − aligned exact match within 0.02", (QZ, AL),
        lambda v: signed(v(QZ) - v(AL)), lambda v: abs(v(QZ) - v(AL)) <= 0.02 + EPS),
    # bench/PROTOCOL.md 2026-12-07 09:57: the cascade scores both on the same held-out rows
    Row("The same, on the rows both were scored on, within 0.02",
        ("cascade.quantized_accuracy", "cascade.full_accuracy"),
        lambda v: signed(v("cascade.quantized_accuracy") - v("cascade.full_accuracy")),
        lambda v: abs(v("cascade.quantized_accuracy") - v("cascade.full_accuracy")) <= 0.02 + EPS),
    Row("Cascade: share served by int8 at exact match within 0.01 of full ≥ 0.50",
        ("cascade.best_share_quantized", "cascade.best_accuracy", "cascade.full_accuracy"),
        lambda v: f"{v('cascade.best_share_quantized'):.2f} ({v('cascade.best_accuracy'):.3f} vs "
                  f"{v('cascade.full_accuracy'):.3f})",
        lambda v: v("cascade.best_share_quantized") >= 0.50
        and v("cascade.best_accuracy") >= v("cascade.full_accuracy") - 0.01 - EPS),
    Row("Registered ÷ fastest candidate, latency p95 ≤ 1.10",
        ("any_cpu.native.serving.registered_vs_best", "any_cpu.native.serving.figures"), _serving("native"),
        lambda v: v("any_cpu.native.serving.registered_vs_best") <= 1.10, optional=True),
    Row("Registered ÷ fastest candidate, latency p95 ≤ 1.10",
        ("any_cpu.avx2.serving.registered_vs_best", "any_cpu.avx2.serving.figures"), _serving("avx2"),
        lambda v: v("any_cpu.avx2.serving.registered_vs_best") <= 1.10, host="AVX2/fp32", optional=True),
    # one demo run against the previous sitting's (bench/PROTOCOL.md, issues 25 and 29)
    Row("Demo exact match with training on validate's shards, within ±0.01",
        (AL, "previous_sitting.aligned_exact_match"),
        lambda v: f"aligned {v(AL):.3f} (before: {v('previous_sitting.aligned_exact_match'):.3f})",
        lambda v: abs(v(AL) - v("previous_sitting.aligned_exact_match")) <= 0.01 + EPS, optional=True),
    Row("Cached re-run ÷ first run ≤ 0.05", ("cached_wall_s", WALL),
        lambda v: f"{v('cached_wall_s'):.0f} s / {v(WALL):.0f} s = {v('cached_wall_s') / v(WALL):.3f}",
        lambda v: v("cached_wall_s") / v(WALL) <= 0.05),
    Row("Orchestration overhead, smoke on the local stack ≤ 20 s", ("orchestration.runs",),
        lambda v: ", ".join(f"{run['overhead_s']:.1f} s" for run in v("orchestration.runs")),
        lambda v: max(run["overhead_s"] for run in v("orchestration.runs")) <= 20),
    Row("LoRA ÷ full fine-tuning peak RSS (mixed precision) ≤ 0.60", (LORA_RSS, AMP_RSS),
        lambda v: f"{v(LORA_RSS):.0f} / {v(AMP_RSS):.0f} MB = {v(LORA_RSS) / v(AMP_RSS):.2f}",
        lambda v: v(LORA_RSS) / v(AMP_RSS) <= 0.60),
    Row("Training FLOP/s ÷ measured bf16 matmul FLOP/s ≥ 0.40", (LORA_UTIL, FULL_UTIL, MATMUL_BF16),
        lambda v: f"LoRA {v(LORA_UTIL):.2f}, full {v(FULL_UTIL):.2f} (matmul {v(MATMUL_BF16) / 1e12:.2f} TFLOP/s)",
        lambda v: v(LORA_UTIL) >= 0.40 and v(FULL_UTIL) >= 0.40),
    # bench/storage_overhead.py (issue 26)
    Row("Smoke wall, storage on S3 ÷ local folder ≤ 1.3",
        ("storage_overhead.s3_over_local", "storage_overhead.s3_s"),
        lambda v: f"{v('storage_overhead.s3_over_local'):.3f} (medians of {len(v('storage_overhead.s3_s'))}, "
                  "interleaved)",
        lambda v: v("storage_overhead.s3_over_local") <= 1.3, optional=True),
    Row("4 concurrent smoke pipelines on one stack: 0 failures",
        (PIPES + "concurrent_failures", PIPES + "concurrent_exits", PIPES + "concurrent_over_alone"),
        lambda v: f"{v(PIPES + 'concurrent_failures')} of {len(v(PIPES + 'concurrent_exits'))} "
                  f"({v(PIPES + 'concurrent_over_alone'):.2f}× one alone)",
        lambda v: v(PIPES + "concurrent_failures") == 0, optional=True),
    Row("16 concurrent promotions: 0 lost, 1 champion",
        (PROMOS + "lost_moves", PROMOS + "champions", PROMOS + "champion_is_better_version"),
        lambda v: f"{v(PROMOS + 'lost_moves')} lost, {v(PROMOS + 'champions')} champion"
                  + (" (the better)" if v(PROMOS + "champion_is_better_version") else " (not the better)"),
        lambda v: v(PROMOS + "lost_moves") == 0 and v(PROMOS + "champions") == 1
        and v(PROMOS + "champion_is_better_version"), optional=True),
    # bench/validate_scale.py --rows 100000 200000 1000000 (issue 29): `make bench` does not run it yet
    Row("Validate 1M rows ≤ 120 s, peak RSS ≤ 2 / 3 GB, 200k rows ≥ 7,200 rows/s", ("validate_scale",),
        _validate, _validate_met, optional=True),
    # bench/gpu_check.py's counts, on a lent GPU
    Row("`make gpu-check`: every GPU path passes", ("gpu_check.passed", "gpu_check.failed", "gpu_check.not_run"),
        lambda v: f"{v('gpu_check.passed')} passed, {v('gpu_check.failed')} failed, "
                  f"{v('gpu_check.not_run')} not run",
        lambda v: v("gpu_check.failed") == 0 and v("gpu_check.not_run") == 0, host="one GPU", optional=True),
    # measured by bench/run.py as it writes the README (the README with this table in it)
    Row("README ≤ 25 KB, `bench/NOTES.md` ≤ 10 KB", ("doc_bytes.readme", "doc_bytes.notes"),
        lambda v: f"{v('doc_bytes.readme') / 1000:.1f} KB, {v('doc_bytes.notes') / 1000:.1f} KB",
        lambda v: v("doc_bytes.readme") <= 25_000 and v("doc_bytes.notes") <= 10_000, host="—", optional=True),
)


def keys_read() -> set[str]:
    """Every results.json path the table reads."""
    return {*META_KEYS, *(k for row in ROWS for k in row.keys)}


def required_keys() -> set[str]:
    """The paths a sitting of `make bench` must hold."""
    return {k for k in META_KEYS if k not in OPTIONAL_META_KEYS} | {k for row in ROWS if not row.optional
                                                                    for k in row.keys}


def cpu_family(name: str) -> str:
    """`AMD EPYC 9R14 96-Core Processor` -> `EPYC`: what the host class cell names."""
    return next((family for family in CPU_FAMILIES if family in name), name)


def host_cell(row: Row, results: dict) -> str:
    cpu = results.get("cpu")
    return f"{row.host} ({cpu_family(cpu)})" if row.host == "bf16" and cpu else row.host


def render_row(row: Row, results: dict) -> str:
    if any(lookup(results, k) is ABSENT for k in row.keys):
        return f"| {row.target} | {NOT_MEASURED} | — | {row.host} | — |"
    v = Reader(results, row.keys)
    met = "—" if row.met is None else ("yes" if row.met(v) else "no")
    return f"| {row.target} | {row.reading(v)} | {met} | {host_cell(row, results)} | {results['date']} |"


def render(results: dict) -> str:
    """The README table for one sitting's results.json (no trailing newline)."""
    return "\n".join([HEADER, *(render_row(row, results) for row in ROWS)])


DEMO_LABELS = (("base", "base"), ("prompted_base", "prompted base"), ("sft", "sft"), ("aligned", "aligned (DPO)"),
               ("quantized", "int8"))
DEMO_METRICS = (("rows", "held-out rows scored", "{:.0f}"), ("exact_match", "exact match", "{:.3f}"),
                ("json_validity", "JSON validity", "{:.3f}"), ("field_accuracy", "field accuracy", "{:.3f}"),
                ("preference_accuracy", "preference accuracy", "{:.3f}"), ("tokens_per_s", "tokens/s (batch 16)",
                                                                            "{:.0f}"),
                ("latency_p95_ms", "latency p95 per request (ms)", "{:.0f}"), ("size_mb", "size on disk (MB)",
                                                                               "{:.0f}"))


def demo_table(results: dict) -> str:
    """The demo's side-by-side table (the README's first table): every artifact of the sitting's demo, every metric
    it was scored on ("—" where it was not: the prompted base has no preference pairs)."""
    m = results["demo_metrics"]
    labels = [(key, name) for key, name in DEMO_LABELS if key in m]
    lines = ["| metric | " + " | ".join(name for _, name in labels) + " |", "|---|" + "---|" * len(labels)]
    for key, name, fmt in DEMO_METRICS:
        cells = [fmt.format(m[label][key]) if key in m[label] else "—" for label, _ in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def splice(readme: str, table: str, begin: str = "<!-- bench:begin -->", end: str = "<!-- bench:end -->") -> str:
    """`readme` with `table` between the bench markers."""
    head, rest = readme.split(begin, 1)
    return head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]
