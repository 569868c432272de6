"""PersonaChat (VLM "dialogue"): persona sentences + the conversation so far -> the next reply.

Layout: `<bos_dial> <persona> persona sentences <speaker1> turn <speaker2> turn ... <speaker1> turn <speaker2> reply
<eos_dial>` with the last `2·max_history + 1` (VLM: 5) turns; speakers alternate back from the reply, which is
`<speaker2>`'s. When too long, the persona is cut first, then the oldest turns (from their front).

A source is `{"persona": [sentence, ...], "history": [utterance, ...]}`. Data:
- ParlAI text (`valid_self_original_no_cands.txt`): numbered lines, `your persona: ...` lines, then
  `partner utterance<TAB>your reply` lines; a line numbered 1 starts a dialogue; each reply is an example;
- Synthetic-Persona-Chat CSV (`user 1 personas`, `user 2 personas`, `Best Generated Conversation` of
  `User 1: ...` / `User 2: ...` lines): every turn after the first is an example, with its speaker's persona;
- HF-style JSON dialogues `{"personality": [...], "utterances": [{"candidates": [..., reply], "history": [...]}]}`
  (a list, or `{"train": [...], "valid": [...]}` as in `personachat_self_original.json`), or HF rows holding
  `personality`, `candidates`, `history` (the reply is the last candidate).
Splits: a single file is split in order, train on its first 80 % of dialogues (a held-out part validates), test
on the rest (the ConvAI2 file: 800 / 200); a folder's files by the split word in their names (`*_valid.csv` is
trained on, with a held-out part, when there is no train file; `*_test.csv` tests).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from hub.data import SPLIT_PATTERNS, holdout, load_records, ordered_split, split_parts
from hub.errors import HubError
from hub.task import ConversationTask, Example, Segment, TaskDefaults, turn_segments

TEST_FRACTION = 0.2
SILENCE = "__SILENCE__"  # ParlAI's placeholder when the partner has not spoken
SPEAKER_LINE = re.compile(r"^[\s*]*User\s*([12])\s*:[\s*]*(.*?)[\s*]*$")
SYNTHETIC_COLUMNS = ("user 1 personas", "user 2 personas", "Best Generated Conversation")
DIALOGUE_SUFFIXES = (".txt", ".csv", ".json", ".jsonl")
SPLIT_WORDS = {"train", "training", "dev", "valid", "validation", "val", "test"}


def _item(dialogue: Any, persona: list[str], history: list[str], reply: str) -> dict:
    """One training item: the dialogue it belongs to (for splits), persona, history before the reply, reply."""
    return {"dialogue": str(dialogue), "persona": list(persona),
            "history": [u for u in history if u.strip() and u.strip() != SILENCE], "reply": reply}


def read_parlai(path: Path) -> list[dict]:
    """ParlAI's "your persona:" format; each reply with the history before it."""
    items, persona, history, dialogue = [], [], [], -1
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            number, _, text = line.partition(" ")
            if not number.isdigit():
                raise HubError(f"{path}, line {n}: expected a numbered ParlAI line ('1 your persona: ...')")
            if number == "1":
                persona, history, dialogue = [], [], dialogue + 1
            if text.startswith("your persona:"):
                persona.append(text[len("your persona:"):].strip())
            elif text.startswith("partner's persona:"):
                continue
            else:
                fields = text.split("\t")
                if len(fields) < 2:
                    raise HubError(f"{path}, line {n}: expected 'partner utterance<TAB>reply'")
                history.append(fields[0])
                items.append(_item(dialogue, persona, history, fields[1]))
                history.append(fields[1])
    return items


def synthetic_items(rows: list[dict], where) -> list[dict]:
    """Synthetic-Persona-Chat rows: both speakers' turns (except the opening one) are replies."""
    missing = [c for c in SYNTHETIC_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise HubError(f"{where}: missing column(s) {missing}; found {sorted(rows[0]) if rows else []}")
    items = []
    for d, row in enumerate(rows):
        personas = {s: [p.strip() for p in row[f"user {s} personas"].splitlines() if p.strip()] for s in "12"}
        turns: list[tuple[str, str]] = []
        for line in row["Best Generated Conversation"].splitlines():
            match = SPEAKER_LINE.match(line)
            if not match or not match[2]:
                continue  # stage directions ("[Later]", "* * *") and empty lines
            if turns and turns[-1][0] == match[1]:  # one speaker twice in a row: one turn
                turns[-1] = (match[1], f"{turns[-1][1]} {match[2]}")
            else:
                turns.append((match[1], match[2]))
        for i in range(1, len(turns)):
            items.append(_item(d, personas[turns[i][0]], [t for _, t in turns[:i]], turns[i][1]))
    return items


def hf_items(dialogues: list[dict], where) -> list[dict]:
    """HF-style dialogues (`personality`, `utterances`) or flat rows (`personality`, `history`, `candidates`)."""
    items = []
    for d, record in enumerate(dialogues):
        if not isinstance(record, dict) or "personality" not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise HubError(f"{where}: expected PersonaChat records with 'personality' and 'utterances' "
                           f"(or 'history' and 'candidates'); found {found}")
        if "utterances" in record:
            turns, group = record["utterances"], d
        else:
            turns, group = [record], record.get("conv_id", json.dumps(record["personality"]))
        for turn in turns:
            if not turn.get("candidates"):
                raise HubError(f"{where}: a PersonaChat utterance needs 'candidates' (the reply is the last)")
            items.append(_item(group, record["personality"], turn.get("history", []), turn["candidates"][-1]))
    return items


def read_dialogue_file(path: Path) -> list[dict]:
    """Items of one file in any of the formats; a JSON object keyed by split is returned as is."""
    if path.suffix == ".txt":
        return read_parlai(path)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return synthetic_items(list(csv.DictReader(f)), path)
    if path.suffix in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
            data = (json.loads(text) if path.suffix == ".json"
                    else [json.loads(line) for line in text.splitlines() if line.strip()])
        except json.JSONDecodeError as err:
            raise HubError(f"{path}: invalid JSON: {err}") from None
        return data if isinstance(data, dict) else hf_items(data, path)
    raise HubError(f"{path}: unsupported PersonaChat file; use ParlAI .txt, Synthetic-Persona-Chat .csv or .json")


def split_of(name: str) -> str | None:
    """The split a file name names by one of its words: `Synthetic-Persona-Chat_valid.csv` -> validation."""
    words = re.split(r"[_\-.\s]+", name.lower())
    return next((split for word in words if word in SPLIT_WORDS for split, pattern in SPLIT_PATTERNS.items()
                 if pattern.match(word)), None)


def dialogue_split(data: str, split: str) -> list[dict]:
    """Items of `split` from a local file or folder (module docstring), or an HF dataset id."""
    path = Path(data).expanduser()

    def group(item: dict):
        return item["dialogue"]

    if path.is_dir():
        files = {split_of(p.name): p for p in sorted(path.iterdir()) if p.suffix in DIALOGUE_SUFFIXES}
        files.pop(None, None)
        parts = {name: (lambda p=p: read_dialogue_file(p)) for name, p in files.items()}
        return split_parts(parts, split, group, path, [p.name for p in files.values()])
    if path.is_file():
        items = read_dialogue_file(path)
        if isinstance(items, dict):
            return _keyed_split(items, split, path)
        if not items:
            raise HubError(f"{path}: no dialogues")
        return ordered_split(items, split, group, TEST_FRACTION)
    return hf_items(load_records(data, split, ("personality",)), f"{data} ({split})")


def _keyed_split(data: dict, split: str, path: Path) -> list[dict]:
    """`{"train": [...], "valid": [...], "test": [...]}`: with no test part, `valid` is the test split (as VLM
    evaluates) and a held-out part of `train` validates."""
    if "train" not in data:
        raise HubError(f"{path}: a JSON object of dialogues needs a 'train' list (found keys {sorted(data)})")
    train = hf_items(data["train"], f"{path} (train)")
    if split == "test":
        key = "test" if "test" in data else "valid"
        if key not in data:
            raise HubError(f"{path}: no 'test' or 'valid' dialogues for the test split")
        return hf_items(data[key], f"{path} ({key})")
    if "test" in data and "valid" in data:
        return train if split == "train" else hf_items(data["valid"], f"{path} (valid)")
    kept, held = holdout(train, lambda item: item["dialogue"])
    return kept if split == "train" else held


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HubError(f"persona input: {what!r} must be a list of strings")
    return [v.strip() for v in value if v.strip()]


class PersonaTask(ConversationTask):
    type_name = "persona"
    description = "PersonaChat chit-chat: persona sentences + conversation -> next reply"
    special_tokens = ("<bos_dial>", "<eos_dial>", "<speaker1>", "<speaker2>", "<persona>")
    # VLM: b 100, 8 x 2, 3 epochs, lr 1e-3 (max_history 2).
    defaults = TaskDefaults(bottleneck=100, lr=1e-3, epochs=3, batch_size=8, grad_accum=2, max_length=512,
                            max_target_length=64, max_new_tokens=64)
    metric = "persona_f1"
    truncates_input = True  # the oldest history is dropped, as in training; a response says so
    default_max_history = 2


    def load_examples(self, data: str, split: str) -> list[Example]:
        items = dialogue_split(data, split)
        examples = [Example(source={"persona": i["persona"], "history": i["history"]}, target=i["reply"].strip())
                    for i in items if i["reply"].strip()]
        if not examples:
            raise HubError(f"{data} ({split}): no PersonaChat replies")
        return examples

    def prompt_segments(self, source: dict) -> list[Segment]:
        turns = turn_segments(source["history"], self.history_window, ("<speaker1>", "<speaker2>"),
                              truncatable=True, keep_end=True)
        return [Segment("<persona>", " ".join(source["persona"]), truncatable=True), *turns, Segment("<speaker2>")]

    def parse_input(self, value: Any) -> dict:
        """`{"persona": [sentence, ...], "history": [utterance, ...]}`, or that as a JSON string."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise HubError('persona input must be a JSON object {"persona": [...], "history": [...]}') from None
        if not isinstance(value, dict):
            raise HubError('persona input must be an object {"persona": [...], "history": [...]}')
        missing = [key for key in ("persona", "history") if key not in value]
        if missing:
            raise HubError(f"persona input is missing {missing}: expected {{\"persona\": [...], \"history\": [...]}}")
        history = _strings(value["history"], "history")
        if not history:
            raise HubError("persona input: 'history' needs at least one utterance (the user's last message)")
        return {"persona": _strings(value["persona"], "persona"), "history": history}

    def parse_chat(self, messages: list[dict]) -> dict:
        """`system` messages are the persona (one sentence a line); user/assistant turns the history. The reply is
        the assistant's next turn, so the conversation must end with the user's message."""
        persona, turns = [], []
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                raise HubError(f"chat message content must be text, got {type(content).__name__}")
            if role == "system":
                persona += [line.strip() for line in content.splitlines() if line.strip()]
            elif role in ("user", "assistant"):
                if not content.strip():
                    continue
                if turns and turns[-1][0] == role:  # the same speaker twice: one turn
                    turns[-1] = (role, f"{turns[-1][1]} {content.strip()}")
                else:
                    turns.append((role, content.strip()))
            else:
                raise HubError(f"unknown chat role {role!r}; use system (persona), user or assistant")
        if not turns or turns[-1][0] != "user":
            raise HubError("chat messages must end with a non-empty 'user' message: the reply is the assistant's")
        return self.parse_input({"persona": persona, "history": [text for _, text in turns]})
