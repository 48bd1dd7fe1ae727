"""Training integration: the schedule follows real optimizer steps in Trainer, Accelerate and plain PyTorch loops,
survives checkpoint/resume, and its noise is reproducible (resume, data-parallel ranks, gradient checkpointing)."""

import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState
from peft import get_peft_model, get_peft_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_decaylora
from peft_decaylora import DecayLoraCallback, DecayLoraConfig, attach_schedule, decay_factor
from peft_decaylora.model import STALLED_SCHEDULE_FORWARDS
from tests.conftest import TwoLayerNet, tiny_bert

REPO = Path(__file__).resolve().parents[1]
SEQ = 8


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_model(seed=0, **config):
    """Tiny BERT (no dropout, so runs are deterministic) with DecayLoRA on query/value and noise on all the way."""
    kwargs = dict(r=4, target_modules=["query", "value"], noise="keep", decay_start=0.25, decay_end=1.0)
    kwargs.update(config)
    base = tiny_bert(seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed + 100)
    return get_peft_model(base, DecayLoraConfig(**kwargs))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 64, (n, SEQ), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.y[i]}


def trainer_args(out, **kw):
    defaults = dict(
        output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, data_seed=0, lr_scheduler_type="constant",
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def adapter_weights(model):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def expected_d(step, total, start=0.25, end=1.0):
    return decay_factor(step, total_steps=total, decay_start=start, decay_end=end, min_decay=0.0)


class CountTrainingForwards:
    def __init__(self, model):
        self.count = 0
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += int(module.training)


class RecordLogs(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B), which the Trainer puts before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# ------------------------------------------------------------------------------------------------------ Trainer
def test_trainer_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    model = make_model()
    forwards = CountTrainingForwards(model)
    recorder = RecordLogs()
    args = trainer_args(tmp_path, gradient_accumulation_steps=4, num_train_epochs=2)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(16), callbacks=[recorder, DecayLoraCallback()])
    # the Trainer calls user callbacks in order, after its reporting integrations: for those to log the schedule too,
    # the callback goes first (what the README says to do)
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(DecayLoraCallback))
    trainer.train()

    assert forwards.count == 16  # micro-batches
    assert trainer.state.global_step == 4
    assert model.peft_config["default"].total_steps == 4  # filled from the Trainer's max_steps
    state = model.base_model.schedule_state()
    assert state["step"] == 4 and state["decay_factor"] == 0.0 and state["noise_scale"] == 1.0

    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4]
    for entry in train_logs:
        d = expected_d(entry["step"], 4)
        assert entry["decay_factor"] == pytest.approx(d)
        assert entry["noise_scale"] == pytest.approx((1 - d * d) ** 0.5 if d < 1 else 0.0)
    # moved to the front, the callback runs before the integrations, so they see the schedule too
    assert [entry["decay_factor"] for entry in recorder.logs if "loss" in entry] == [
        entry["decay_factor"] for entry in train_logs
    ]


def test_trainer_resume_reproduces_uninterrupted_run(tmp_path):
    def run(out, resume=None, noise_seed=0):
        model = make_model(noise_seed=noise_seed)
        args = trainer_args(out, gradient_accumulation_steps=2, max_steps=8, save_strategy="steps", save_steps=4)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(24), callbacks=[DecayLoraCallback()])
        trainer.train(resume_from_checkpoint=resume)
        history = {e["step"]: (e["decay_factor"], e["noise_scale"], e["loss"]) for e in trainer.state.log_history
                   if "loss" in e}
        return model, history

    full_model, full = run(tmp_path / "full")
    assert {step: v[0] for step, v in full.items()} == pytest.approx({s: expected_d(s, 8) for s in range(1, 9)})

    resumed_model, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed_model.base_model.schedule_state()["step"] == 8
    for step in range(5, 9):
        assert resumed[step][:2] == pytest.approx(full[step][:2])
        assert resumed[step][2] == pytest.approx(full[step][2], rel=1e-5)  # same noise -> same loss
    full_weights, resumed_weights = adapter_weights(full_model), adapter_weights(resumed_model)
    assert full_weights.keys() == resumed_weights.keys()
    for key in full_weights:
        torch.testing.assert_close(resumed_weights[key], full_weights[key], rtol=1e-5, atol=1e-6)
    # the noise matters: resuming with another noise seed ends elsewhere
    other_model, _ = run(tmp_path / "other", resume=str(tmp_path / "full" / "checkpoint-4"), noise_seed=1)
    other_weights = adapter_weights(other_model)
    assert max((other_weights[k] - full_weights[k]).abs().max().item() for k in full_weights) > 1e-4


def test_trainer_without_schedule_length_raises(tmp_path):
    model = make_model()
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=Tokens(8))
    with pytest.raises(RuntimeError, match=r"DecayLoraCallback\(\).*attach_schedule"):
        trainer.train()


def test_callback_keeps_explicit_total_steps_and_rejects_non_decaylora_models(tmp_path):
    model = make_model(total_steps=10)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=Tokens(8),
                      callbacks=[DecayLoraCallback()])
    with pytest.warns(UserWarning, match="total_steps=10"):
        trainer.train()
    assert model.peft_config["default"].total_steps == 10
    assert model.base_model.schedule_state()["step"] == 2

    plain = tiny_bert()
    trainer = Trainer(model=plain, args=trainer_args(tmp_path, max_steps=1), train_dataset=Tokens(8),
                      callbacks=[DecayLoraCallback()])
    with pytest.raises(ValueError, match="no active DecayLoRA adapter"):
        trainer.train()


def calibration_sample(dataset, count, batch_size, seed=0):
    """The batches that ``DecayLoraCallback(calibration_batches=count)`` documents: drawn with the run's seed."""
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=count * batch_size,
                                             generator=torch.Generator().manual_seed(seed))
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler))


def test_callback_calibration_is_the_activation_aware_split_keeps_the_order_and_survives_resume(tmp_path):
    data = Tokens(24)

    def run(out, calibration_batches=0, by_hand=None, resume=None):
        model = make_model()
        if by_hand is not None:
            peft_decaylora.initialize_from_activations(model, by_hand)
        args = trainer_args(out, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[DecayLoraCallback(calibration_batches=calibration_batches)])
        trainer.train(resume_from_checkpoint=resume)
        return model, {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    calibrated, losses = run(tmp_path / "callback", calibration_batches=3)
    by_hand, hand_losses = run(tmp_path / "by_hand", by_hand=calibration_sample(data, 3, 2))
    # the same split, then the same batches in the same order: the sampling left the training order alone
    assert losses == pytest.approx(hand_losses, rel=1e-6)
    weights, hand_weights = calibrated.state_dict(), by_hand.state_dict()
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.decaylora_B0.default" in weights
    for key in weights:
        torch.testing.assert_close(weights[key], hand_weights[key], rtol=1e-5, atol=1e-6)
    plain, _ = run(tmp_path / "plain")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.decaylora_B0.default"
    assert (plain.state_dict()[key] - weights[key]).abs().max() > 1e-2  # the calibration changed the split
    # a resumed run does not calibrate again: the checkpoint carries the split it was trained with
    resumed, resumed_losses = run(tmp_path / "resumed", calibration_batches=3,
                                  resume=str(tmp_path / "callback" / "checkpoint-3"))
    assert [resumed_losses[step] for step in (4, 5, 6)] == pytest.approx([losses[step] for step in (4, 5, 6)], rel=1e-5)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6)


def test_callback_rejects_a_bad_calibration_count():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="`calibration_batches`"):
            DecayLoraCallback(calibration_batches=bad)


# ------------------------------------------------------------------------------------------ plain PyTorch loops
def test_attach_schedule_requires_a_length_and_steps_once_per_optimizer_step():
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=r"total_steps=\.\.\."):
        attach_schedule(model, optimizer)
    with pytest.raises(RuntimeError, match="attach_schedule"):  # the forward refuses too
        model.train()(torch.randint(0, 64, (2, SEQ)))

    attach_schedule(model, optimizer, total_steps=8)
    handle = attach_schedule(model, optimizer, total_steps=8)  # attaching again replaces, never doubles
    assert model.peft_config["default"].total_steps == 8
    data = Tokens(8)
    for i in range(6):  # 6 micro-batches, accumulation of 3 by hand -> 2 optimizer steps
        batch = data[i]
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        if i % 3 == 2:
            optimizer.step()
            optimizer.zero_grad()
    assert model.base_model.schedule_state()["step"] == 2
    saved = [v.item() for k, v in get_peft_model_state_dict(model).items() if k.endswith("decaylora_step")]
    assert saved == [2] * 4  # every layer's saved step moved with the schedule
    handle.remove()
    optimizer.step()
    assert model.base_model.schedule_state()["step"] == 2


def test_training_forwards_that_never_move_the_schedule_warn_once():
    model = make_model(total_steps=8).train()
    tokens = torch.randint(0, 64, (2, SEQ))

    def stall_warnings(forwards, step_every=None, optimizer=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(1, forwards + 1):
                model(tokens)
                if step_every and i % step_every == 0:
                    optimizer.step()
        return [w for w in caught if "nothing moved it" in str(w.message)]

    assert not stall_warnings(STALLED_SCHEDULE_FORWARDS - 1)
    with torch.no_grad():  # evaluation forwards do not count
        model(tokens)
    caught = stall_warnings(STALLED_SCHEDULE_FORWARDS + 50)
    assert len(caught) == 1 and "DecayLoraCallback" in str(caught[0].message)
    assert "'default'" in str(caught[0].message) and "step 0" in str(caught[0].message)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    attach_schedule(model, optimizer)
    assert not stall_warnings(2 * STALLED_SCHEDULE_FORWARDS, step_every=STALLED_SCHEDULE_FORWARDS - 1,
                              optimizer=optimizer)
    assert model.base_model.schedule_state()["step"] == 2


def test_attach_schedule_skips_steps_skipped_by_grad_scaler():
    model = peft_decaylora_model_two_layer()
    params = [p for p in model.parameters() if p.requires_grad]
    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator's gradient state
    scaler = torch.amp.GradScaler("cpu")
    optimizer = AcceleratedOptimizer(torch.optim.SGD(params, lr=0.1), device_placement=False, scaler=scaler)
    attach_schedule(model, optimizer, total_steps=4)
    for poison in (False, True, False):
        loss = model(torch.randn(3, 24)).square().mean()
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        optimizer.step()  # AcceleratedOptimizer calls scaler.step / scaler.update
        optimizer.zero_grad()
    assert optimizer.step_was_skipped is False  # the last one ran
    assert model.base_model.schedule_state()["step"] == 2  # the inf step was skipped by the scaler


def peft_decaylora_model_two_layer():
    return get_peft_model(TwoLayerNet(), DecayLoraConfig(r=4, target_modules=["lin0", "lin1"], noise="keep"))


def run_accelerate(workdir, micro_batches, total_steps=8, save_at=None, load=False):
    """Accelerate loop, gradient accumulation 2; records the schedule after every real optimizer step."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    attach_schedule(model, optimizer, total_steps=total_steps)
    if load:
        accelerator.load_state(str(workdir))
    data, seen = Tokens(micro_batches), {}
    model.train()
    for i in range(accelerator.step, micro_batches):
        batch = data[i]
        with accelerator.accumulate(model):
            loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            state = accelerator.unwrap_model(model).base_model.schedule_state()
            seen[state["step"]] = (state["decay_factor"], loss.item())
            if save_at == state["step"]:
                accelerator.save_state(str(workdir))
    return accelerator.unwrap_model(model), seen


def test_accelerate_accumulation_and_save_load_state(tmp_path):
    full_model, full = run_accelerate(tmp_path, 16, save_at=4)
    assert sorted(full) == list(range(1, 9))  # 16 micro-batches, accumulation 2 -> 8 steps
    assert {s: v[0] for s, v in full.items()} == pytest.approx({s: expected_d(s, 8) for s in range(1, 9)})

    resumed_model, resumed = run_accelerate(tmp_path, 16, load=True)
    assert sorted(resumed) == list(range(5, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5)
    full_weights, resumed_weights = adapter_weights(full_model), adapter_weights(resumed_model)
    for key in full_weights:
        torch.testing.assert_close(resumed_weights[key], full_weights[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ reproducible noise
def noisy_logits(model, tokens):
    model.train()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_noise_is_a_function_of_seed_layer_step_and_forward_index(tokens):
    a, b = make_model(total_steps=8), make_model(total_steps=8)
    for m in (a, b):
        m.base_model.set_step(4)
    first, second = noisy_logits(a, tokens), noisy_logits(a, tokens)
    assert not torch.allclose(first, second)  # fresh noise for every training forward
    assert torch.equal(noisy_logits(b, tokens), first)  # another replica draws the same noise
    assert torch.equal(noisy_logits(b, tokens), second)
    a.base_model.set_step(4)  # a restart at the same step replays the sequence
    assert torch.equal(noisy_logits(a, tokens), first)
    a.base_model.set_step(5)
    assert not torch.allclose(noisy_logits(a, tokens), first)
    c = make_model(total_steps=8, noise_seed=1)
    c.base_model.set_step(4)
    assert not torch.allclose(noisy_logits(c, tokens), first)


def noisy_training_model(checkpointing_reentrant=None):
    """The test model at step 4 (noise on) in training mode, with gradient checkpointing when a mode is given."""
    model = make_model(total_steps=8)
    model.base_model.set_step(4)
    if checkpointing_reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing_reentrant})
        model.enable_input_require_grads()
    model.train()
    return model


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients_with_noise(reentrant):
    data = Tokens(4, seed=3)

    def grads(checkpointing):
        model = noisy_training_model(reentrant if checkpointing else None)
        for i in range(0, 4, 2):  # two accumulated micro-batches: forward indices 0 and 1
            model(input_ids=data.x[i:i + 2], labels=data.y[i:i + 2]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 12
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    at_step_4 = make_model(total_steps=8)
    at_step_4.base_model.set_step(4)
    assert at_step_4.base_model.schedule_state()["noise_scale"] > 0.5  # the noise is really on


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_refuses_to_replay_the_wrong_noise(reentrant):
    """Two forwards into one backward: the recomputation cannot know which forward's noise to replay, so instead of
    wrong gradients (76% off in this model) there is an error naming the layer."""
    data = Tokens(4, seed=3)
    model = noisy_training_model(reentrant)
    loss = sum(model(input_ids=data.x[i:i + 2], labels=data.y[i:i + 2]).loss for i in (0, 2))
    with pytest.raises(RuntimeError, match=r"layer 'bert\.encoder\.layer\.1\..*recomputed its "
                                           r"noisy forward twice"):
        loss.backward()
    # without checkpointing the same two forwards train: nothing is recomputed
    model.gradient_checkpointing_disable()
    loss = sum(model(input_ids=data.x[i:i + 2], labels=data.y[i:i + 2]).loss for i in (0, 2))
    loss.backward()


def test_torch_compile_trains_as_eager_mode_does():
    """torch.compile (the Trainer's `torch_compile=True`) breaks the graph at each adapted layer, but it must compute
    what eager mode computes: the same losses and updates through warm-up, the noise phase and the decay without
    noise (a compiled replica with other noise fails this)."""
    data = Tokens(8, seed=5)
    models = [make_model(total_steps=4, noise="vanish", noise_threshold=0.5, distillation="off") for _ in range(2)]
    runs = [models[0], torch.compile(models[1])]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in models]
    noise_on = []
    for step in range(4):  # d = 1, 1, 2/3 (noise), 1/3 (none)
        losses = []
        for model, run, optimizer in zip(models, runs, optimizers):
            model.train()
            model.base_model.set_step(step)
            loss = run(input_ids=data.x[step:step + 2], labels=data.y[step:step + 2]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        noise_on.append(models[0].base_model.schedule_state()["noise_scale"] > 0)
    assert noise_on == [False, False, True, False]
    eager, compiled = adapter_weights(models[0]), adapter_weights(models[1])
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains(tokens):
    model = make_model(total_steps=8)
    model.base_model.set_step(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    attach_schedule(model, optimizer)
    model.train()
    labels = torch.tensor([0, 1, 0])
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=tokens, labels=labels)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad()
    assert model.base_model.schedule_state()["step"] == 6


# -------------------------------------------------------------------------------------------------- 2 processes
WORKER = r"""
import sys, torch
from accelerate import Accelerator
from peft import get_peft_model, get_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification
import peft_decaylora

out = sys.argv[1]
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
torch.manual_seed(0)
base = BertForSequenceClassification(BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
model = get_peft_model(base, peft_decaylora.DecayLoraConfig(
    r=4, target_modules=["query", "value"], noise="keep", decay_start=0.25, decay_end=1.0))
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 64, (16, 8), generator=g), torch.randint(0, 2, (16,), generator=g)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
peft_decaylora.attach_schedule(model, optimizer, total_steps=6)
model.train()
first = None
for epoch in range(3):  # 4 micro-batches per rank per epoch, accumulation 2 -> 6 optimizer steps
    for inputs, labels in loader:
        first = inputs.clone() if first is None else first
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=inputs, labels=labels).loss)
            optimizer.step()
            optimizer.zero_grad()
peft_model = accelerator.unwrap_model(model)
with torch.no_grad():
    noisy = peft_model(input_ids=x[:3]).logits  # train mode: a noise draw, rank-local
torch.save({"state": peft_model.base_model.schedule_state(), "weights": get_peft_model_state_dict(peft_model),
            "noisy": noisy, "first": first, "world": accelerator.num_processes},
           f"{out}/rank{accelerator.process_index}.pt")
"""


def test_two_process_data_parallel(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert not torch.equal(r0["first"], r1["first"])  # the ranks saw different data
    assert r0["state"] == r1["state"]
    assert r0["state"]["step"] == 6 and r0["state"]["decay_factor"] == 0.0
    assert r0["weights"].keys() == r1["weights"].keys()
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
    assert torch.equal(r0["noisy"], r1["noisy"])  # the ranks draw the same noise
