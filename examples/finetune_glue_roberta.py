"""Fine-tune RoBERTa for sequence classification with HyC-LoRA through a standard transformers Trainer.

This is the script a PEFT LoRA user writes: the import of hyclora_models and the model line are the only
changes (and --bits the only option PEFT lacks). With PEFT the model line reads

    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels),
        LoraConfig(task_type="SEQ_CLS", r=args.r, lora_alpha=args.lora_alpha,
                   target_modules=["query", "key", "value", "dense"]))

and here the HyC class loads the same checkpoint with LoRA on the same modules and the classification head
trained whole (as PEFT's task_type="SEQ_CLS" does), keeping the activations backward needs as ~2-bit codes.

Data: a GLUE task through the `datasets` library (``--task sst2``, the default; needs `pip install datasets`
and network), or your own files (``--train_file train.jsonl --validation_file dev.jsonl``; CSV or JSON
Lines with a ``text`` column, an optional ``text_pair`` column and a ``label`` column of integers or
names). Evaluation, each epoch and at the end, reports accuracy. The adapter (LoRA weights + classifier
head, PEFT's format, no base weights) is saved each epoch (checkpoint-N/, with the optimizer state) and at
the end to --output_dir, where
``peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), output_dir)``
or ``HyCRobertaForSequenceClassification.from_pretrained(output_dir)`` load it. (Trainer's
resume_from_checkpoint and load_best_model_at_end know adapters only on a peft.PeftModel: not these, yet.)

    python examples/finetune_glue_roberta.py --model FacebookAI/roberta-base --task sst2 --output_dir out/sst2
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

import hyclora_models as H

# GLUE's classification tasks (stsb, a regression, has no accuracy) and their text columns
GLUE_TASKS = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
              "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
              "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="FacebookAI/roberta-base", help="RoBERTa checkpoint (directory or Hub id)")
    p.add_argument("--task", default="sst2", choices=sorted(GLUE_TASKS), help="GLUE task (needs `datasets`)")
    p.add_argument("--train_file", help="CSV/JSONL with text, [text_pair,] label columns (instead of --task)")
    p.add_argument("--validation_file", help="the same, for evaluation (needed with --train_file)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max_steps", type=int, default=-1, help="if > 0, overrides --epochs")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--bits", type=int, default=2, choices=[2, 4, 8, 16], help="bits per kept activation")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if bool(args.train_file) != bool(args.validation_file):
        p.error("--train_file and --validation_file go together")
    return args


def read_rows(path) -> list[dict]:
    """The rows of a CSV (with a header) or JSON Lines file."""
    with open(path, newline="", encoding="utf-8") as f:
        if Path(path).suffix == ".csv":
            return list(csv.DictReader(f))
        return [json.loads(line) for line in f if line.strip()]


def local_data(args, tokenizer):
    """Tokenised train and validation examples from --train_file/--validation_file and the number of labels.
    Labels are integers 0..n-1 (as numbers or digit strings) or names (numbered in sorted order)."""
    splits = [read_rows(args.train_file), read_rows(args.validation_file)]
    labels = {str(row["label"]) for rows in splits for row in rows}
    if all(label.isdigit() for label in labels):
        label2id = {label: int(label) for label in labels}
    else:
        label2id = {name: i for i, name in enumerate(sorted(labels))}
        print(f"labels: {label2id}")

    def encode(row):
        pair = row.get("text_pair") or None
        features = tokenizer(row["text"], pair, truncation=True, max_length=args.max_length)
        return {**features, "label": label2id[str(row["label"])]}

    train, validation = ([encode(row) for row in rows] for rows in splits)
    return train, validation, max(label2id.values()) + 1


def glue_data(args, tokenizer):
    """Tokenised train and validation splits of a GLUE task and the number of labels."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("--task needs the `datasets` library: pip install datasets "
                         "(or pass your own data with --train_file/--validation_file)") from None
    raw = load_dataset("nyu-mll/glue", args.task)
    first, second = GLUE_TASKS[args.task]

    def encode(batch):
        return tokenizer(batch[first], batch[second] if second else None, truncation=True,
                         max_length=args.max_length)

    columns = [c for c in raw["train"].column_names if c != "label"]
    data = raw.map(encode, batched=True, remove_columns=columns)
    validation = "validation_matched" if args.task == "mnli" else "validation"
    return data["train"], data[validation], raw["train"].features["label"].num_classes


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None):
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load = local_data if args.train_file else glue_data
    train_dataset, eval_dataset, num_labels = load(args, tokenizer)

    # the one line that differs from a PEFT script (see the docstring)
    model = H.HyCRobertaForSequenceClassification.from_pretrained(
        args.model, num_labels=num_labels,
        hyclora_config=H.HyCLoRAConfig(r=args.r, lora_alpha=args.lora_alpha,
                                       target_modules=["query", "key", "value", "dense"], bits=args.bits))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_steps=10,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval accuracy {metrics['eval_accuracy']:.4f} (loss {metrics['eval_loss']:.4f})")
    trainer.save_model(args.output_dir)
    print(f"adapter (LoRA weights + classifier head) saved to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
