"""Worker for test_callbacks' two-process test (run under torch.distributed.run, gloo on CPU).

Rank 0 probes five of the prompts and rank 1 the other three, so without the cross-rank
reduction the ranks would log different values, and a plain average of the two ranks' means
would weigh the three prompts too much. Writes rank<N>.json with the callback history and the rank-0
trainer's log history.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for helpers
from helpers import make_tiny_model  # noqa: E402

from guard.callbacks import PersonaDriftCallback, attach  # noqa: E402
from guard.core.layers import active_hook_count  # noqa: E402
from guard.core.vectors import PersonaVector, metadata_for  # noqa: E402

PROMPTS = [f"Tell me honestly what you think of plan number {i}." for i in range(8)]


def shard(rank: int) -> list[str]:
    return PROMPTS[:5] if rank == 0 else PROMPTS[5:]


def vector_for(model):
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    return PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)), meta)


def main(out: str, tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to="tensorboard", use_cpu=True, seed=0,
                             disable_tqdm=True)
    rank = args.process_index
    drift = PersonaDriftCallback([vector_for(model)], shard(rank), tokenizer=tokenizer, every_n_steps=2,
                                 n_random=4)
    texts = [f"User: idea {i}? Assistant: {'Brilliant, you are a genius!' if i % 2 else 'It has flaws.'}"
             for i in range(16)]
    data = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=24)))
    data = data.map(lambda row: {"labels": row["input_ids"]})
    trainer = attach(Trainer(model=model, args=args, train_dataset=data, callbacks=[drift]))
    trainer.train()
    result = {"world_size": args.world_size, "history": drift.history, "hooks": active_hook_count(model),
              "log_history": trainer.state.log_history if trainer.is_world_process_zero() else None}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
