"""CoQA (VLM "qa"): a story + the question/answer history + a question -> its free-form answer.

Layout: `<bos_qa> <document> story <question> q <answer> a ... <question> q_n <answer> answer <eos_qa>` with the
last `2·max_history + 1` (VLM: 3 — Q, A, Q) turns; the story is capped at 400 BPE tokens, each question/answer
at 50 (VLM). When the context is still short, the story is cut from its end first, then the oldest turns.

A source is `{"story": str, "history": [[question, answer], ...], "question": str}`; loaded examples also hold
`id`, `turn_id` (for the official `{id, turn_id, answer}` output) and `references`: every gold answer of the turn
(the answer, then the `additional_answers`), for the CoQA F1 over several golds. Data: the official JSON
(`{"version", "data": [{"id", "story", "questions": [{"input_text", "turn_id"}], "answers": [{"input_text",
"span_text", "turn_id"}], "additional_answers": {"0": [...]}}]}`) or HF `stanfordnlp/coqa` rows (`story`,
`questions` [str], `answers` {"input_text": [...]}). A single file is split in order by story: train on the first
80 % (a held-out part validates), test on the rest; an HF dataset's `validation` split (CoQA dev) is the test
split and a held-out part of `train` validates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hub.data import holdout, load_records
from hub.errors import HubError
from hub.task import ConversationTask, Example, Segment, TaskDefaults, turn_segments

DOCUMENT_MAX_TOKENS, TURN_MAX_TOKENS = 400, 50
TEST_FRACTION = 0.2


def _story_key(record: dict) -> str:
    return str(record.get("id") or record.get("story", ""))


def _official_turns(story: dict, where: str) -> list[dict]:
    """(question, answer, references, turn_id) per turn of an official-format story, matched by turn_id."""
    answers = {a["turn_id"]: a for a in story["answers"]}
    extra = [{a["turn_id"]: a for a in answers_list} for answers_list in story.get("additional_answers", {}).values()]
    turns = []
    for question in story["questions"]:
        turn = question.get("turn_id")
        if turn not in answers:
            raise HubError(f"{where}: story {story.get('id')!r} has no answer for turn {turn}")
        golds = [answers[turn]["input_text"]] + [more[turn]["input_text"] for more in extra if turn in more]
        turns.append({"question": question["input_text"], "answer": golds[0], "references": golds, "turn_id": turn})
    return turns


def _hf_turns(story: dict, where: str) -> list[dict]:
    """Turns of an HF `stanfordnlp/coqa` row (questions and answers aligned by position)."""
    answers = story["answers"]["input_text"] if isinstance(story["answers"], dict) else None
    if not isinstance(answers, list) or len(answers) != len(story["questions"]):
        raise HubError(f"{where}: story {_story_key(story)[:40]!r}: answers must be "
                       f"{{'input_text': [...]}} with one answer per question")
    return [{"question": q, "answer": a, "references": [a], "turn_id": i}
            for i, (q, a) in enumerate(zip(story["questions"], answers), 1)]


def story_examples(stories: list[dict], where: str) -> list[Example]:
    """One example per question: the story, the gold history before it, the question -> the answer."""
    examples = []
    for story in stories:
        if not isinstance(story, dict) or not all(key in story for key in ("story", "questions", "answers")):
            found = sorted(story) if isinstance(story, dict) else type(story).__name__
            raise HubError(f"{where}: a CoQA story needs 'story', 'questions' and 'answers'; found {found}")
        questions = story["questions"]
        turns = (_hf_turns if questions and isinstance(questions[0], str) else _official_turns)(story, where)
        history: list[list[str]] = []
        for turn in turns:
            if turn["question"].strip() and turn["answer"].strip():
                examples.append(Example(
                    source={"story": story["story"], "history": [list(h) for h in history],
                            "question": turn["question"], "id": story.get("id"), "turn_id": turn["turn_id"],
                            "references": turn["references"]},
                    target=turn["answer"]))
            history.append([turn["question"], turn["answer"]])
    if not examples:
        raise HubError(f"{where}: no CoQA questions with answers")
    return examples


class CoQATask(ConversationTask):
    type_name = "coqa"
    description = "CoQA conversational QA: story + question/answer history + question -> answer"
    special_tokens = ("<bos_qa>", "<eos_qa>", "<question>", "<answer>", "<document>")
    # VLM: b 300, 2 x 8, 5 epochs, lr 5e-4; context: BOS + <document> 400 + 3 turns of 1 + 50 + <answer> 50 + EOS.
    defaults = TaskDefaults(bottleneck=300, lr=5e-4, epochs=5, batch_size=2, grad_accum=8,
                            max_length=2 + DOCUMENT_MAX_TOKENS + 3 * (1 + TURN_MAX_TOKENS) + 1 + TURN_MAX_TOKENS + 1,
                            max_target_length=TURN_MAX_TOKENS, max_new_tokens=TURN_MAX_TOKENS)
    metric = "coqa"
    truncates_input = True  # the story is capped and old turns dropped, as in training; a response says so
    default_max_history = 1


    def load_examples(self, data: str, split: str) -> list[Example]:
        if Path(data).expanduser().exists():
            stories = load_records(data, split, ("story", "questions", "answers"), group=_story_key,
                                   test_fraction=TEST_FRACTION)
        elif split == "test":  # CoQA's test set is hidden: its dev set (HF `validation`) is the test split
            stories = load_records(data, "validation", ("story", "questions", "answers"))
        else:
            kept, held = holdout(load_records(data, "train", ("story", "questions", "answers")), _story_key)
            stories = kept if split == "train" else held
        return story_examples(stories, f"{data} ({split})")

    def prompt_segments(self, source: dict) -> list[Segment]:
        utterances = [text for pair in source["history"] for text in pair] + [source["question"]]
        turns = turn_segments(utterances, self.history_window, ("<question>", "<answer>"),
                              max_tokens=TURN_MAX_TOKENS, truncatable=True)
        document = Segment("<document>", source["story"], truncatable=True, max_tokens=DOCUMENT_MAX_TOKENS)
        return [document, *turns, Segment("<answer>")]

    def parse_input(self, value: Any) -> dict:
        """`{"story": str, "history": [[question, answer], ...], "question": str}` (history optional), or that as
        a JSON string."""
        shape = '{"story": "...", "history": [["question", "answer"], ...], "question": "..."}'
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise HubError(f"coqa input must be a JSON object {shape}") from None
        if not isinstance(value, dict):
            raise HubError(f"coqa input must be an object {shape}")
        for key in ("story", "question"):
            if not isinstance(value.get(key), str) or not value[key].strip():
                raise HubError(f"coqa input needs a non-empty {key!r} string: {shape}")
        history = value.get("history", [])
        if not isinstance(history, list) or not all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
                for pair in history):
            raise HubError(f"coqa input: 'history' must be a list of [question, answer] string pairs: {shape}")
        return {"story": value["story"], "history": [list(pair) for pair in history],
                "question": value["question"].strip()}

    def parse_chat(self, messages: list[dict]) -> dict:
        """`system` messages are the story; user/assistant turns alternate question/answer, ending with the user's
        question. Without a system message, the last user message is the JSON input."""
        story = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "system").strip()
        if not story:
            return super().parse_chat(messages)
        turns = [m for m in messages if m.get("role") in ("user", "assistant")]
        roles = [m["role"] for m in turns]
        if not turns or roles != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
            raise HubError("coqa chat: after the system story, user questions and assistant answers must "
                           "alternate, starting and ending with a user question")
        texts = [m.get("content") or "" for m in turns]
        return self.parse_input({"story": story, "history": [texts[i:i + 2] for i in range(0, len(texts) - 1, 2)],
                                 "question": texts[-1]})
