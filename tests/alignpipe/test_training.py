"""The shared training module: the modules a Ray worker imports stay light (no Prefect among them), the flow's
process loads no trainer machinery; the progress callback reports a real TRL run to the progress board."""

import subprocess
import sys

from alignpipe.callbacks import ProgressReport
from alignpipe.models import load_model, load_tokenizer


def test_the_training_and_stage_modules_import_no_prefect():
    probe = ("import sys; import alignpipe.training, alignpipe.tasks.sft, alignpipe.tasks.align, "
             "alignpipe.tasks.evaluate, alignpipe.tasks.quantize, alignpipe.tasks.validate, alignpipe.tasks.register; "
             "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_importing_the_flow_loads_no_trainer_machinery():
    """The flow's process submits the training stages; only their Ray workers train. transformers' Trainer
    utilities pull in peft and torch's distributed tensors: seconds at every `alignpipe run`'s start."""
    probe = ("import sys; import alignpipe.flows.pipeline; "
             "print(sorted(m for m in ('peft', 'trl', 'transformers.trainer_utils', 'alignpipe.callbacks') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_the_progress_callback_reports_steps_loss_and_tokens_of_a_real_trl_run(progress_board, tiny_model, tmp_path):
    """What rank 0 of a training stage adds to its trainer: a real SFTTrainer on the tiny model, 3 steps."""
    from datasets import Dataset
    from peft import LoraConfig
    from testlib import wait_for_progress
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": [{"role": "user", "content": f"Card for person {i}?"},
                          {"role": "assistant", "content": f'{{"name": "P{i}"}}'}]} for i in range(6)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, activation_checkpointing=False, use_cpu=True, max_length=64,
                     save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=load_model(tiny_model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(tiny_model), callbacks=[ProgressReport("sft")],
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
    trainer.train()
    entry = wait_for_progress("sft", lambda e: e["done"] == 3)  # the end of training always reports
    assert entry["kind"] == "train" and entry["total"] == 3 and entry["eta_s"] == 0.0
    assert entry["loss"] > 0 and entry["tokens_per_s"] > 0
