"""Injected transformers models under save_pretrained and Trainer: the folder loads back as the trained model,
the base weights under their own names, the adapter in peft's format, and Trainer checkpoints resume exactly.

A tiny GPT-2 (Conv1D) with LoRA on every linear layer, built offline; Trainer runs on the CPU, no hub.
"""

import peft
import pytest
import torch
from conftest import randomize_lora, rel_err, tiny_gpt2, tokens
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

import fastlora
from fastlora import LoraConfig

CONFIG = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear")
IDS = tokens(3, 10, seed=2)
FP32 = 1e-5
ROWS = [{"input_ids": ids, "labels": ids} for ids in tokens(16, 10, seed=5)]


def injected() -> torch.nn.Module:
    model = fastlora.inject(tiny_gpt2(), CONFIG)
    randomize_lora(model)
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora" not in k}


def test_save_pretrained_writes_the_base_under_its_own_names_and_a_peft_adapter(tmp_path):
    model = injected()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    plain = base_weights(tiny_gpt2())
    plain.pop("lm_head.weight")  # tied to wte: transformers saves it once
    assert {k for k in saved if ".adapters." not in k} == set(plain)
    assert all(torch.equal(saved[k], plain[k]) for k in plain)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()


def test_from_pretrained_of_the_folder_gives_the_trained_model(tmp_path):
    """transformers loads the base from model.safetensors (no key missing) and the peft adapter beside it."""
    model = injected()
    model.save_pretrained(tmp_path)
    loaded, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in loaded.modules())
    assert rel_err(logits(loaded), logits(model)) <= FP32
    plain = fastlora.load_adapter(tiny_gpt2(), tmp_path)  # and fastlora reads the adapter into the plain model
    assert rel_err(logits(plain), logits(model)) <= FP32
    plain.save_pretrained(tmp_path / "again")  # which then saves as an injected model does
    again, info = GPT2LMHeadModel.from_pretrained(tmp_path / "again", output_loading_info=True)
    assert not info["missing_keys"] and (tmp_path / "again" / "adapter_config.json").is_file()
    assert rel_err(logits(again), logits(model)) <= FP32


def test_a_plain_checkpoint_loads_into_an_injected_model():
    model = injected()
    donor = tiny_gpt2(seed=7)
    result = model.load_state_dict(donor.state_dict(), strict=False)
    assert all(".adapters." in k for k in result.missing_keys) and not result.unexpected_keys
    assert torch.equal(model.transformer.h[0].attn.c_attn.base_layer.weight, donor.transformer.h[0].attn.c_attn.weight)


def test_save_pretrained_refuses_merged_adapters_and_saves_an_unloaded_model_plainly(tmp_path):
    model = fastlora.merge(injected())
    with pytest.raises(ValueError, match="merged into their base weight"):
        model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # refused before anything is written
    expected = logits(model)
    fastlora.unload(model)
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "adapter_config.json").exists()
    assert rel_err(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "plain")), expected) <= FP32


def trainer(model, out, steps: int, **extra) -> Trainer:
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, seed=0, logging_steps=1, **extra)
    return Trainer(model=model, args=args, train_dataset=ROWS)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_save_model_loads_back_with_from_pretrained(tmp_path):
    model = injected()
    before = lora_state(model)
    run = trainer(model, tmp_path / "run", steps=3, save_strategy="no")
    run.train()
    assert all(not torch.equal(p, before[n]) for n, p in lora_state(model).items())
    run.save_model(str(tmp_path / "out"))
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    assert rel_err(logits(loaded), logits(model)) <= FP32
    base = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out")  # peft reads the adapter on the base
    assert rel_err(logits(base), logits(model)) <= FP32


def test_trainer_resumes_exactly_from_a_checkpoint(tmp_path):
    """Dropout is on: the resumed run must also restore the RNG that draws fastlora's dropout seeds."""
    straight = injected()
    trainer(straight, tmp_path / "straight", steps=4, save_strategy="no").train()
    first = injected()
    trainer(first, tmp_path / "resumed", steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = fastlora.inject(tiny_gpt2(seed=9), CONFIG)  # other base and LoRA weights: the checkpoint restores both
    trainer(resumed, tmp_path / "resumed", steps=4, save_strategy="no").train(resume_from_checkpoint=str(checkpoint))
    expected = lora_state(straight)
    for name, param in lora_state(resumed).items():
        assert rel_err(param, expected[name]) <= 1e-6, name
    assert all(torch.equal(v, base_weights(straight)[k]) for k, v in base_weights(resumed).items())
