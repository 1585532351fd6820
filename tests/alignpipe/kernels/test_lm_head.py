"""The compact LM head gives what TRL's fused head gives (values and gradients), projecting only labelled rows."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from alignpipe.kernels import lm_head
from alignpipe.kernels.lm_head import compact_lm_head
from alignpipe.models import load_model

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0                      # right padding, as the SFT collator makes
    labels = input_ids.clone()
    labels[:, :5] = -100                           # the prompt: no loss
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _run(model, batch):
    """Fused outputs, and the gradients of loss + entropy (GRPO's bonus backpropagates through entropy)."""
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    (out.loss + 0.1 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.fixture
def fused_model(tiny_model):
    model = load_model(tiny_model)  # fp32: both heads must agree to float rounding
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    return model


@pytest.mark.parametrize("chunk_rows,temperature", [(None, 1.0), (4, 0.7)], ids=["one-chunk", "chunks-of-4-rows"])
def test_compact_head_matches_trls_fused_head(tiny_model, monkeypatch, chunk_rows, temperature):
    """Values and gradients (through log-probabilities and entropy), in one chunk of rows or several."""
    fused_model = load_model(tiny_model)  # fp32: both heads must agree to float rounding
    add_fused_lm_head(fused_model, temperature=temperature,
                      outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    if chunk_rows:
        monkeypatch.setattr(lm_head, "_CHUNK_ELEMENTS", chunk_rows * fused_model.config.vocab_size)
    batch = _batch(fused_model.config.vocab_size)
    theirs, their_grads = _run(fused_model, batch)
    assert compact_lm_head(fused_model, temperature)
    ours, our_grads = _run(fused_model, batch)

    torch.testing.assert_close(ours.loss, theirs.loss)
    for name in FIELDS:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-5, rtol=1e-4, msg=name)
    assert not ours.log_probs[~ours.label_mask].any()  # zero where the label is ignored, as TRL's
    assert their_grads.keys() == our_grads.keys() and their_grads
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_only_labelled_rows_reach_the_head_and_other_calls_are_untouched(fused_model):
    batch = _batch(fused_model.config.vocab_size)
    with torch.no_grad():
        plain_logits = fused_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert compact_lm_head(fused_model)
    assert not compact_lm_head(fused_model)  # wrapped once only
    rows = []
    hook = fused_model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    with torch.no_grad():
        fused_model(**batch, fused_lm_head=True)
        # generation and plain forwards: the model's own head, full logits, unchanged
        again = fused_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hook.remove()
    assert rows[0] == int((batch["labels"][:, 1:] != -100).sum())  # the shifted labels that count, nothing else
    torch.testing.assert_close(again, plain_logits)


def test_models_whose_logits_it_cannot_reproduce_keep_trls_head(tiny_model):
    model = load_model(tiny_model)
    assert not compact_lm_head(model)  # no fused head to wrap
    add_fused_lm_head(model)
    model.config.final_logit_softcapping = 30.0
    assert not compact_lm_head(model)


def test_fp32_head_matches_trls_cast_lm_head_to_fp32(tiny_model):
    """GRPO's `cast_lm_head_to_fp32` on bf16 weights: the projection in fp32, as TRL's head does it."""
    model = load_model(tiny_model, dtype="bfloat16")
    add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        theirs = model(**batch, fused_lm_head=True)
        assert compact_lm_head(model, fp32_head=True)
        ours = model(**batch, fused_lm_head=True)
    assert ours.log_probs.dtype == torch.float32
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-5, rtol=1e-4, msg=name)


def _plain_row_stats(logits, targets, temperature):
    """The same statistics as plain autograd ops over the whole [rows, vocab] block (what the head ran before)."""
    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    with torch.no_grad():
        rest = (p.square().sum(-1).log(), z.mean(-1), z.argmax(-1) == targets)
    return (log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(p * log_p).sum(-1), *rest)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sft_gradients_are_the_plain_ops_bit_for_bit(tiny_model, monkeypatch, temperature):
    """bf16 weights under autocast, as the demo trains, several chunks: where the entropy gets no gradient (SFT,
    DPO, KTO), a step is the same with the chunked statistics as with plain ops, so a run takes the same steps."""
    model = load_model(tiny_model, dtype="bfloat16")
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    assert compact_lm_head(model, temperature)
    monkeypatch.setattr(lm_head, "_CHUNK_ELEMENTS", 4 * model.config.vocab_size)
    batch = _batch(model.config.vocab_size)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, our_grads = step()
    with monkeypatch.context() as m:
        m.setattr(lm_head._RowStats, "apply", _plain_row_stats)
        plain, plain_grads = step()
    exact = {"atol": 0.0, "rtol": 0.0}
    torch.testing.assert_close(ours.loss, plain.loss, **exact)
    torch.testing.assert_close(ours.entropy, plain.entropy, atol=1e-6, rtol=1e-5)  # logged only
    assert our_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(our_grads[name], grad, msg=name, **exact)
