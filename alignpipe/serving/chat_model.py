"""MLflow "models from code" pyfunc: prompts in, greedy chat answers out, from the merged model.

Logged as a file by the `register` stage and executed by `mlflow.pyfunc.load_model` wherever the model is
served, so it imports only mlflow, torch, transformers, pandas and the standard library (never alignpipe).
Config (`context.model_config`): `system_prompt`, `max_new_tokens`, optional `batch_size`, `base_model` when
the artifact is an adapter (adapter-only registration; then peft is needed too), and `int8_cpu_kernel` /
`int8_per_token_modules` / `kernels` for an int8-dynamic artifact served on CPU (then `int8_cpu.py` comes as code
and, for `auto`, picks the kernel from the serving host's CPU).
"""

import mlflow
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class ChatModel(mlflow.pyfunc.PythonModel):
    """One user turn per prompt; answers are decoded greedily and end at the end-of-turn token."""

    def load_context(self, context):
        path = context.artifacts["model"]
        config = context.model_config or {}
        self.system_prompt = config.get("system_prompt") or None
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        self.batch_size = int(config.get("batch_size", 16))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = config.get("base_model")
        if base:  # adapter-only registration: the artifact is a PEFT adapter for this (pinned) base model
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), path)
            self.model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        elif self.device == "cpu" and _fbgemm(config):
            import int8_cpu  # shipped with the model (code_paths)

            # int8 weights in PyTorch's fused dynamic-quantized linears, as the pipeline's evaluate ran them
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            int8_cpu.use_fbgemm_linears(self.model, tuple(config.get("int8_per_token_modules",
                                                                     int8_cpu.PER_TOKEN_MODULES)))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        self.model = self.model.to(self.device).eval()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """Answer each prompt.

        Args:
            context: The MLflow model context (unused; everything is loaded in `load_context`).
            model_input: Prompts: a DataFrame (column "prompt", else the first), which is what pyfunc hands over
                for a list, a string or a DataFrame; called directly, a list of prompts or one prompt also works.
                (The DataFrame hint also tells mlflow not to infer a signature from it.)
            params: Optional overrides; `max_new_tokens`.

        Returns:
            One answer string per prompt.
        """
        prompts = _prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        answers = []
        for i in range(0, len(prompts), self.batch_size):
            answers.extend(self._generate(prompts[i : i + self.batch_size], max_new))
        return answers

    def _generate(self, prompts, max_new_tokens):
        tok = self.tokenizer
        texts = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # The template already holds the special tokens; adding BOS again would change the prompt.
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        return [text.strip() for text in tok.batch_decode(new_tokens, skip_special_tokens=True)]


def _fbgemm(config: dict) -> bool:
    """Whether this host runs the int8 artifact through fused linears (`int8_cpu_kernel`, resolved here)."""
    setting = config.get("int8_cpu_kernel")
    if setting not in ("fbgemm", "auto"):
        return False
    import int8_cpu  # alignpipe/kernels/int8_cpu.py, logged beside this file (code_paths): torch + torchao only

    return int8_cpu.resolve_cpu_kernel(setting, config.get("kernels", "auto")) == "fbgemm"


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, pd.Series) or hasattr(model_input, "tolist"):  # Series, numpy array
        model_input = model_input.tolist()
    if isinstance(model_input, dict) and "prompt" in model_input:
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else [str(p) for p in value]
    if isinstance(model_input, (list, tuple)):
        return [str(p) for p in model_input]
    raise TypeError(f"expected a prompt string, a list of prompts or a DataFrame, got {type(model_input).__name__}")


mlflow.models.set_model(ChatModel())
