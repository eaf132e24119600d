"""Worker for test_accelerate: a Trainer with both callbacks, run by ``accelerate launch`` in two
CPU processes (gloo). Rank 0 probes five prompts and rank 1 three (distributed_drift's shards), so
equal values on both ranks mean the reduction ran. Writes rank<N>.json: the callback history, how
many reports this rank wrote, hook counts, steering counts and this rank's log history.
"""

import json
import sys
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for helpers
sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_tiny_model  # noqa: E402
from distributed_drift import shard, vector_for  # noqa: E402

from guard.callbacks import PersonaDriftCallback, PreventativeSteeringCallback, attach  # noqa: E402
from guard.core.layers import active_hook_count  # noqa: E402


class CountingDrift(PersonaDriftCallback):
    reports = 0

    def write_report(self, path, state=None):
        self.reports += 1
        return super().write_report(path, state)


def main(out: str, tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    args = TrainingArguments(output_dir=out, max_steps=5, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="no",
                             report_to="tensorboard", use_cpu=True, seed=0, disable_tqdm=True)
    rank = args.process_index
    vector = vector_for(model)
    drift = CountingDrift([vector], shard(rank), tokenizer=tokenizer, n_random=4)
    steer = PreventativeSteeringCallback(vector, 2.0)
    texts = [f"User: idea {i}? Assistant: {'Brilliant, you are a genius!' if i % 2 else 'It has flaws.'}"
             for i in range(16)]
    data = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=24)))
    data = data.map(lambda row: {"labels": row["input_ids"]})
    trainer = attach(Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)),
                             callbacks=[drift, steer]))
    trainer.train()
    result = {"world_size": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
              "history": drift.history, "reports": drift.reports, "hooks": active_hook_count(model),
              "steered_forwards": steer.steered_forwards,
              "log_history": [e for e in trainer.state.log_history if any("persona/" in k for k in e)]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
