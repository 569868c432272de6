"""How many steps until an E2E adapter on the frozen backbone names the restaurant and follows the MR.

Trains `e2e` with the task's VLM recipe and, at every evaluation, decodes test MRs greedily with the current
adapter through the serving engine, reporting how often the output contains the `name` value and each slot
value (exact, case-insensitive). Writes a JSON and a markdown table.

    python -m bench.e2e_learning_curve --base ../shared/models/gpt2-standin \
        --data ../shared/data/e2e/original --epochs 10 --eval-every 100 --out docs/e2e_learning_curve
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from hub.serving.batch import decode_to_completion
from hub.model.backbone import load_backbone
from hub.serving.engine import Engine, SamplingParams
from hub.store.local import AdapterStore
from hub.training.run_dir import RunDir
from hub.training.trainer import TrainConfig, Trainer
from tasks import make_task
from tasks.e2e import parse_mr

COPYABLE_SLOTS = ("name", "near", "food", "area", "eatType")


def slot_recall(mr: str, text: str) -> tuple[bool, float]:
    """(name mentioned, share of copyable slot values mentioned)."""
    slots = dict(parse_mr(mr))
    text = text.lower()
    values = [slots[s].lower() for s in COPYABLE_SLOTS if s in slots]
    return slots.get("name", "").lower() in text, sum(v in text for v in values) / max(1, len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--samples", type=int, default=60, help="unique test MRs decoded per evaluation")
    parser.add_argument("--bottleneck", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    task = make_task("e2e")
    mrs = list(dict.fromkeys(e.source for e in task.load_examples(args.data, "test")))[: args.samples]
    backbone = load_backbone(args.base, "cpu", dtype=torch.float32)
    serving = load_backbone(args.base, "cpu")
    engine = Engine(serving, make_task)
    work = Path(tempfile.mkdtemp())
    store = AdapterStore(work / "store")
    rows: list[dict] = []

    def on_eval(trainer: Trainer, result: dict) -> None:
        trainer.export(work / "export", {})
        stored = store.publish(work / "export", version=str(trainer.step))
        engine.manager.add_adapter(store.load(stored.ref, serving.fingerprint))
        sequences = [engine.new_sequence("e2e", mr, SamplingParams(max_new_tokens=60)) for mr in mrs]
        decode_to_completion(engine, sequences)
        recalls = [slot_recall(mr, s.text) for mr, s in zip(mrs, sequences)]
        row = {**result, "name_rate": sum(n for n, _ in recalls) / len(recalls),
               "slot_recall": sum(r for _, r in recalls) / len(recalls), "example": sequences[0].text.strip()}
        rows.append(row)
        print(json.dumps(row))

    d = task.defaults
    config = TrainConfig(name="e2e", task_type="e2e", task_config={}, data=args.data,
                         bottleneck=args.bottleneck or d.bottleneck, lr=d.lr, batch_size=d.batch_size,
                         grad_accum=d.grad_accum, max_length=d.max_length, epochs=args.epochs,
                         max_steps=args.max_steps, eval_every=args.eval_every, base=args.base)
    run_dir = work / "run"
    RunDir(run_dir).prepare(config)
    Trainer(backbone, task, config, run_dir, on_eval=on_eval).train(
        task.load_examples(args.data, "train"), task.load_examples(args.data, "validation"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"first_mr": mrs[0], "rows": rows}, indent=1))
    lines = ["| step | held-out loss | outputs naming the restaurant | slot values mentioned | output for the first MR |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['eval_loss']:.3f} | {100 * r['name_rate']:.0f} % | {100 * r['slot_recall']:.0f} % "
              f"| {r['example']} |" for r in rows]
    args.out.with_suffix(".md").write_text(f"First MR: `{mrs[0]}`\n\n" + "\n".join(lines) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
