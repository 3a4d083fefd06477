"""Fine-tune a Llama causal LM on text files with transformers' Trainer and HyC LoRA.

A standard Trainer script: the one line that differs from PEFT's is the model line (PEFT's is beside it).
Checkpoints hold the adapter only (PEFT's format plus the Trainer's own state), and ``--resume`` continues
from the last one in ``--output-dir`` with the same losses as an uninterrupted run.

    python examples/finetune_causal_lm.py --model ~/.cache/hyclora_models/SmolLM2-135M-Instruct.Q4_1 \\
        --data plays.txt --output-dir smollm2-plays --max-steps 200
    python examples/finetune_causal_lm.py ... --resume          # after an interruption

(``python -m hyclora_models.demo`` puts SmolLM2-135M-Instruct in ~/.cache/hyclora_models.) Mistral: swap in
``HyCMistralForCausalLM``. TRL's ``SFTTrainer`` takes the same model in place of ``model=``/``peft_config=``.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator

import hyclora_models as H

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def blocks(tokenizer, text: str, seq_len: int) -> list[dict]:
    """The text as consecutive ``seq_len``-token examples (the remainder dropped)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    return [{"input_ids": row, "labels": row} for row in rows]


def main(argv=None) -> Trainer:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Llama checkpoint (directory or Hub id) with its tokenizer")
    p.add_argument("--data", required=True, nargs="+", help="plain-text files; the last 5%% is held out")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint (and evaluate) every so many steps")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = blocks(tokenizer, "\n\n".join(Path(f).read_text(encoding="utf-8") for f in args.data), args.seq_len)
    n_eval = max(1, len(examples) // 20)

    cuda = torch.cuda.is_available()
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
    # PEFT: model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=...), LoraConfig(**lora))
    model = H.HyCLlamaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                  hyclora_config=H.HyCLoRAConfig(bits=2, **lora))

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.max_steps // 20,
        logging_steps=args.logging_steps, eval_strategy="steps", eval_steps=args.save_steps,
        save_steps=args.save_steps, report_to="none", seed=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=examples[:-n_eval],
                      eval_dataset=examples[-n_eval:], data_collator=default_data_collator,
                      processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume or None)
    print(trainer.evaluate())
    trainer.save_model()  # the adapter, in PEFT's format
    return trainer


if __name__ == "__main__":
    main()
