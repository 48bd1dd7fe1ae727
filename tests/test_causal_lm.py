"""Decoder LLMs: every block linear of a (tiny, random) Llama compressed at a stated fraction, then generate() from
the compressed checkpoint; TRL's SFTTrainer; gradient checkpointing and bf16 autocast."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_decaylora
from peft_decaylora import CompressedLayer, DecayLoraCallback, DecayLoraConfig

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOTAL = 10


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def trained_decaylora(keep_fraction=0.6, **config):
    model = get_peft_model(tiny_llama(), DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=keep_fraction,
                                                         total_steps=TOTAL, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.base_model.set_step(TOTAL)
    return model.eval()


def test_keep_fraction_compresses_every_block_linear_by_that_share():
    dense = tiny_llama()
    linears = {k: m for k, m in dense.named_modules() if k.rsplit(".", 1)[-1] in BLOCK_LINEARS}
    compressed = trained_decaylora(keep_fraction=0.6).compress_and_unload()
    layers = {k: m for k, m in compressed.named_modules() if isinstance(m, CompressedLayer)}
    assert layers.keys() == linears.keys()  # all 7 of every layer
    kept = sum(m.down.weight.numel() + m.up.weight.numel() for m in layers.values())
    full = sum(m.weight.numel() for m in linears.values())
    assert kept / full == pytest.approx(0.6, abs=0.03)  # ranks are rounded per layer


@pytest.mark.parametrize("sampling", [False, True])
def test_generate_from_the_loaded_compressed_model_matches_the_decaylora_model(tmp_path, sampling):
    model = trained_decaylora()
    prompt = torch.tensor([[1, 5, 9, 12, 7], [1, 3, 3, 8, 20]])
    kwargs = dict(max_new_tokens=12, do_sample=sampling, pad_token_id=0, **({"top_k": 8} if sampling else {}))
    torch.manual_seed(0)
    expected = model.generate(input_ids=prompt, **kwargs)
    peft_decaylora.save_compressed(model.compress_and_unload(), tmp_path)
    loaded = peft_decaylora.load_compressed(tmp_path)
    torch.manual_seed(0)
    with_cache = loaded.generate(input_ids=prompt, **kwargs)
    torch.manual_seed(0)
    without_cache = loaded.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, expected) and torch.equal(without_cache, expected)
    assert with_cache.shape == (2, 5 + 12)


def test_gradient_checkpointing_and_bf16_autocast_train_the_llm():
    model = get_peft_model(tiny_llama(), DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=0.6,
                                                         total_steps=TOTAL))
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    tokens = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model.base_model.set_step(5), reference.base_model.set_step(5)
    model.train(), reference.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    reference(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, parameter in reference.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


def test_trl_sft_trainer_trains_with_the_schedule_moving_per_optimizer_step(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t3")),
                                        pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")

    model = tiny_llama()
    tokens = [[1] + [int(t) for t in torch.randint(3, 64, (15,), generator=torch.Generator().manual_seed(i))]
              for i in range(16)]
    data = Dataset.from_dict({"input_ids": tokens})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                         learning_rate=1e-3, disable_tqdm=True, save_strategy="no")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=0.6,
                                                         decay_end=1.0),
                             callbacks=[DecayLoraCallback()])
    trainer.train()
    tuner = trainer.model.base_model
    assert tuner.schedule_state() == {"step": 4, "decay_factor": 0.0, "noise_active": False, "noise_scale": 0.0}
    logged = [entry["decay_factor"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0.75, 0.5, 0.25, 0.0]  # decay from step round(0.4) = 0 to round(4.0) = 4
    assert isinstance(trainer.model.compress_and_unload().model.layers[0].mlp.down_proj, CompressedLayer)


def test_auto_decay_end_is_thirty_percent_of_a_causal_lms_run():
    model = get_peft_model(tiny_llama(), DecayLoraConfig(target_modules=BLOCK_LINEARS, total_steps=TOTAL))
    assert model.peft_config["default"].decay_end == 0.3
    model.base_model.set_step(2)
    assert 0.0 < model.base_model.schedule_state()["decay_factor"] < 1.0
    model.base_model.set_step(3)
    assert model.base_model.schedule_state()["decay_factor"] == 0.0


def test_auto_decay_end_before_decay_start_is_refused_with_the_model_unchanged():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"decay_end='auto'` is 0.3"):
        get_peft_model(model, DecayLoraConfig(target_modules=BLOCK_LINEARS, decay_start=0.4))
    assert not any("decaylora" in name for name, _ in model.named_modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_auto_distillation_runs_no_teacher_for_a_causal_lm_where_hidden_states_adds_one():
    tokens = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for mode in ("auto", "off", "hidden_states"):
        model = trained_decaylora(distillation=mode)
        model.base_model.set_step(TOTAL // 2)  # mid-decay: student and teacher differ
        with torch.no_grad():
            losses[mode] = model.train()(input_ids=tokens, labels=tokens).loss
    assert torch.equal(losses["auto"], losses["off"])
    assert losses["hidden_states"] > losses["off"] + 1e-4


def test_logit_distillation_adds_the_kl_to_the_pretrained_next_token_distribution_on_trained_positions():
    tokens = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[1, 8:] = -100  # padding: neither its positions nor the one predicting it count
    model = trained_decaylora(distillation="logits", distillation_weight=2.0)
    model.base_model.set_step(TOTAL // 2)
    with torch.no_grad():
        with model.disable_adapter():
            teacher = model.eval()(input_ids=tokens).logits
        model.base_model.peft_config["default"].distillation = "off"
        plain = model.train()(input_ids=tokens, labels=labels)
        model.base_model.peft_config["default"].distillation = "logits"
        distilled = model(input_ids=tokens, labels=labels)
    kept = [(b, t) for b in range(2) for t in range(11) if labels[b, t + 1] != -100]
    kl = sum(torch.sum(teacher[b, t].softmax(-1) * (teacher[b, t].log_softmax(-1) - plain.logits[b, t].log_softmax(-1)))
             for b, t in kept) / len(kept)
    assert kl > 1e-4
    torch.testing.assert_close(distilled.logits, plain.logits)
    torch.testing.assert_close(distilled.loss, plain.loss + 2.0 * kl)


def test_logit_distillation_refuses_trls_fused_lm_head_before_any_forward():
    trl = pytest.importorskip("trl")
    base = tiny_llama()
    trl.trainer.add_fused_lm_head(base)  # as SFTTrainer does: no (batch, length, vocab) logits are made
    model = get_peft_model(base, DecayLoraConfig(target_modules=BLOCK_LINEARS, keep_fraction=0.6, total_steps=TOTAL,
                                                 distillation="logits"))
    tokens = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    forwards = []
    base.model.embed_tokens.register_forward_hook(lambda *_: forwards.append(1))
    with pytest.raises(ValueError, match="distillation='logits'.*`logits`.*'auto' or 'off'"):
        model.train()(input_ids=tokens, labels=tokens, fused_lm_head=True)
    assert not forwards  # refused up front, not after a training forward
    model.base_model.peft_config["default"].distillation = "auto"  # no teacher: TRL's loss as it computes it
    assert torch.isfinite(model(input_ids=tokens, labels=tokens, fused_lm_head=True).loss)
