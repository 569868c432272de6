"""The task types persona, summarize, translate and coqa: reading every supported format, split mapping, the exact
VLM layout (through a TaskCodec and the stand-in tokenizer), truncation, serving input; one end-to-end CoQA run."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import hub.data
from hub.errors import HubError, NotFoundError
from hub.task import IGNORE_INDEX, Example, TaskCodec
from tasks import TASK_TYPES, make_task
from tasks.persona import dialogue_split
from tests.conftest import SHARED, STANDIN

DATA = SHARED / "data"
CONVAI2 = DATA / "personachat" / "convai2" / "valid_self_original_no_cands.txt"
SYNTHETIC = DATA / "personachat" / "synthetic_persona_chat"
FRANK = DATA / "summarization" / "frank_cnndm_xsum_test_subset.jsonl"
MULTI30K = DATA / "multi30k"
IWSLT14 = DATA / "iwslt14_de_en"
IWSLT_TOY = DATA / "iwslt_toy_joeynmt"
COQA_SAMPLE = Path(__file__).parent / "fixtures" / "coqa_sample.json"
METRICS = Path(__file__).resolve().parents[1] / "hub" / "evaluation" / "metrics"
FIRST_ID = 8192  # the stand-in's vocabulary size: task tokens come after it


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STANDIN)


def codec_for(task, tokenizer, max_length: int = 1024) -> TaskCodec:
    return TaskCodec(task, tokenizer, FIRST_ID, max_length)


def marker_names(codec: TaskCodec, ids: list[int]) -> list[str]:
    names = {i: tok for tok, i in codec.token_ids.items()}
    return [names[i] for i in ids if i >= FIRST_ID]


def texts_between_markers(codec: TaskCodec, ids: list[int]) -> list[str]:
    """The decoded text after each special token (empty where two markers follow each other)."""
    texts, current = [], []
    for i in ids + [codec.eos_id]:
        if i >= FIRST_ID:
            texts.append(codec.tokenizer.decode(current).strip())
            current = []
        else:
            current.append(i)
    return texts[1:]


def check_types_and_labels(codec: TaskCodec, encoded) -> None:
    """Each token is typed by the marker that opens its segment (BOS by itself, the target and EOS by the target
    marker); only the target tokens and the EOS are labelled."""
    ids, types, labels = encoded.input_ids, encoded.token_type_ids, encoded.labels
    assert len(ids) == len(types) == len(labels)
    assert ids[0] == types[0] == codec.token_ids[codec.task.bos] and ids[-1] == codec.eos_id
    current = None
    for i, t in zip(ids, types):
        if i >= FIRST_ID and i != codec.eos_id:
            current = i
        assert t == current
    target_start = max(n for n, i in enumerate(ids) if i >= FIRST_ID and i != codec.eos_id) + 1
    assert labels[:target_start] == [IGNORE_INDEX] * target_start
    assert labels[target_start:] == ids[target_start:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fake_hf(monkeypatch):
    """Stands in for the HF hub: records which (name, split, config) was asked for and returns given rows."""
    calls, rows = [], {}

    def load(name, split, config):
        calls.append((name, split, config))
        if split not in rows:
            raise HubError(f"cannot load dataset {name!r} split {split!r}")
        return rows[split]

    monkeypatch.setattr(hub.data, "_load_hf", load)
    return calls, rows


# -- registry -----------------------------------------------------------------------------------------------------

def test_every_task_names_an_existing_metric_and_vlm_defaults():
    assert {"e2e", "text2text", "persona", "summarize", "translate", "coqa"} <= set(TASK_TYPES)
    assert {name: cls.metric for name, cls in TASK_TYPES.items()} == {
        "e2e": "e2e", "text2text": "sacrebleu", "persona": "persona_f1", "summarize": "rouge",
        "translate": "sacrebleu", "coqa": "coqa",
        "lm": "sacrebleu"}  # never decoded: `hub eval` scores it by perplexity
    for cls in TASK_TYPES.values():
        assert (METRICS / cls.metric / f"{cls.metric}.py").is_file()
    recipe = {name: (d.bottleneck, d.lr, d.epochs, d.batch_size, d.grad_accum)
              for name, d in ((n, TASK_TYPES[n].defaults) for n in ("persona", "summarize", "translate", "coqa"))}
    assert recipe == {"persona": (100, 1e-3, 3, 8, 2), "summarize": (100, 5e-4, 10, 4, 8),
                      "translate": (300, 5e-4, 8, 8, 4), "coqa": (300, 5e-4, 5, 2, 8)}
    assert TASK_TYPES["summarize"].defaults.max_target_length == 130
    assert TASK_TYPES["translate"].defaults.max_target_length == 100
    assert TASK_TYPES["coqa"].defaults.max_target_length == 50
    assert TASK_TYPES["persona"].special_tokens == ("<bos_dial>", "<eos_dial>", "<speaker1>", "<speaker2>", "<persona>")
    assert TASK_TYPES["coqa"].special_tokens == ("<bos_qa>", "<eos_qa>", "<question>", "<answer>", "<document>")
    assert TASK_TYPES["translate"].special_tokens == ("<bos_mt>", "<eos_mt>", "<source_mt>", "<target_mt>")
    assert TASK_TYPES["summarize"].special_tokens == ("<bos_sm>", "<eos_sm>", "<source_sm>", "<target_sm>")


# -- persona --------------------------------------------------------------------------------------------------------

def test_persona_reads_parlai_text_and_splits_800_200_dialogues():
    split = {name: dialogue_split(str(CONVAI2), name) for name in ("train", "validation", "test")}
    dialogues = {name: {item["dialogue"] for item in items} for name, items in split.items()}
    assert dialogues["test"] == {str(d) for d in range(800, 1000)}
    assert dialogues["train"] | dialogues["validation"] == {str(d) for d in range(800)}
    assert not dialogues["train"] & dialogues["validation"] and 20 <= len(dialogues["validation"]) <= 60

    task = make_task("persona")
    train = task.load_examples(str(CONVAI2), "train") + task.load_examples(str(CONVAI2), "validation")
    first = next(e for e in train if e.source["history"] == ["hello what are doing today ?"])
    assert first.source["persona"] == ["i read twenty books a year.", "i'm a stunt double as my second job.",
                                       "i only eat kosher.", "i was raised in a single parent household."]
    assert first.target == "i am good , i just got off work and tired , i have two jobs ."
    second = next(e for e in train if e.target == "i rather read , i've read about 20 books this year .")
    assert second.source["history"] == ["hello what are doing today ?",
                                        "i am good , i just got off work and tired , i have two jobs .",
                                        "i just got done watching a horror movie"]
    assert len(task.load_examples(str(CONVAI2), "test")) == len(split["test"])


def test_persona_parlai_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("your persona: i like tea.\n")
    with pytest.raises(HubError, match="numbered ParlAI line"):
        make_task("persona").load_examples(str(bad), "train")


def test_persona_reads_synthetic_csv_folder_valid_trains_test_tests():
    task = make_task("persona")
    folder = str(SYNTHETIC)
    test_items = dialogue_split(folder, "test")
    # 968 conversations in the test file; 2 have no "User N:" lines (one is empty, one unlabelled) and give nothing
    assert len({item["dialogue"] for item in test_items}) == 966
    train_items = dialogue_split(folder, "train") + dialogue_split(folder, "validation")
    assert {item["dialogue"] for item in train_items} <= {str(d) for d in range(1000)}
    assert len({item["dialogue"] for item in train_items}) > 990
    with (SYNTHETIC / "Synthetic-Persona-Chat_valid.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    first = [e for e in task.load_examples(folder, "train") + task.load_examples(folder, "validation")
             if e.source["history"] == ["Hi!"]]
    assert first and first[0].target == "Hello!"
    assert first[0].source["persona"] == [p for p in row["user 2 personas"].splitlines() if p.strip()]


def test_persona_synthetic_conversation_parsing(tmp_path):
    path = tmp_path / "chats_valid.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user 1 personas", "user 2 personas", "Best Generated Conversation"])
        for n in range(4):
            writer.writerow([f"I bake.\nI have {n} cats.", "I run.", "User 1: Hi!\n\n[Later]\n*User 2:* Hello! *\n"
                             "User 2: How are you?\n* * *\nUser 1: Fine."])
    items = dialogue_split(str(path), "test")  # a single file: its last 20 % of conversations
    assert {item["dialogue"] for item in items} == {"3"}
    assert [(i["persona"], i["history"], i["reply"]) for i in items] == [
        (["I run."], ["Hi!"], "Hello! How are you?"),
        (["I bake.", "I have 3 cats."], ["Hi!", "Hello! How are you?"], "Fine."),
    ]


def test_persona_reads_hf_style_json(tmp_path, fake_hf):
    dialogues = [{"personality": [f"i am person {d}."], "utterances": [
        {"candidates": ["wrong", "hello there"], "history": ["__SILENCE__", "hi"]},
        {"candidates": ["nope", "fine thanks"], "history": ["hi", "hello there", "how are you?"]},
    ]} for d in range(10)]
    task = make_task("persona")
    listed = tmp_path / "personachat.json"
    listed.write_text(json.dumps(dialogues))
    test = task.load_examples(str(listed), "test")
    assert [(e.source, e.target) for e in test] == [
        ({"persona": ["i am person 8."], "history": ["hi"]}, "hello there"),
        ({"persona": ["i am person 8."], "history": ["hi", "hello there", "how are you?"]}, "fine thanks"),
        ({"persona": ["i am person 9."], "history": ["hi"]}, "hello there"),
        ({"persona": ["i am person 9."], "history": ["hi", "hello there", "how are you?"]}, "fine thanks"),
    ]
    keyed = tmp_path / "personachat_self_original.json"
    keyed.write_text(json.dumps({"train": dialogues[:8], "valid": dialogues[8:]}))
    assert [e.source for e in task.load_examples(str(keyed), "test")] == [e.source for e in test]
    assert len(task.load_examples(str(keyed), "train")) + len(task.load_examples(str(keyed), "validation")) == 16

    calls, rows = fake_hf
    rows["train"] = [{"personality": ["i like tea."], "candidates": ["x", "me too"], "history": ["i like tea"],
                      "conv_id": 0, "utterance_idx": 0}]
    [example] = task.load_examples("bavard/personachat_truecased", "train")
    assert (example.source, example.target) == ({"persona": ["i like tea."], "history": ["i like tea"]}, "me too")
    rows["validation"] = [{"history": ["x"]}]
    with pytest.raises(HubError, match="personality"):
        task.load_examples("bavard/personachat_truecased", "validation")


def test_persona_layout_last_five_turns_speaker2_replies(tokenizer):
    task = make_task("persona")
    codec = codec_for(task, tokenizer)
    history = [f"turn number {n}" for n in range(1, 8)]
    example = Example(source={"persona": ["i like cats.", "i am a chef."], "history": history}, target="me too")
    encoded = codec.encode_example(example)
    assert marker_names(codec, encoded.input_ids) == [
        "<bos_dial>", "<persona>", "<speaker1>", "<speaker2>", "<speaker1>", "<speaker2>", "<speaker1>",
        "<speaker2>", "<eos_dial>"]
    assert texts_between_markers(codec, encoded.input_ids) == [
        "", "i like cats. i am a chef.", *history[-5:], "me too", ""]
    check_types_and_labels(codec, encoded)
    one = codec_for(make_task("persona", {"max_history": 1}), tokenizer).encode_example(example)
    assert marker_names(codec, one.input_ids)[2:-1] == ["<speaker1>", "<speaker2>", "<speaker1>", "<speaker2>"]
    short = codec.encode_example(Example({"persona": [], "history": ["hi"]}, "hello"))
    assert marker_names(codec, short.input_ids) == ["<bos_dial>", "<persona>", "<speaker1>", "<speaker2>", "<eos_dial>"]


def test_persona_truncation_cuts_the_persona_then_the_oldest_turn(tokenizer):
    task = make_task("persona")
    persona = [f"i have a pet number {n} and it is lovely." for n in range(30)]
    history = ["hello , how are you today ?", "i am fine , and you ?", "great , i just came back from the park ."]
    codec = codec_for(task, tokenizer, max_length=64)
    ids, _ = codec.encode_prompt({"persona": persona, "history": history}, reserve=10)
    assert len(ids) + 10 <= 64
    texts = texts_between_markers(codec, ids)
    assert texts[2:5] == history and texts[1] and " ".join(persona).startswith(texts[1])
    tight = codec_for(task, tokenizer, max_length=24)
    ids, _ = tight.encode_prompt({"persona": persona, "history": history}, reserve=4)
    assert len(ids) + 4 <= 24
    texts = texts_between_markers(tight, ids)
    assert texts[-2] == history[-1] and history[0].endswith(texts[2]) and len(texts[1].split()) <= 1
    with pytest.raises(HubError, match="too long"):
        codec_for(task, tokenizer, max_length=8).encode_prompt({"persona": persona, "history": history})


def test_persona_serving_input_and_chat():
    task = make_task("persona")
    source = {"persona": ["i like tea.", " "], "history": ["hi !", "hello"]}
    assert task.parse_input(source) == {"persona": ["i like tea."], "history": ["hi !", "hello"]}
    assert task.parse_input(json.dumps(source)) == task.parse_input(source)
    for bad, words in [({"history": ["hi"]}, "persona"), ({"persona": []}, "history"), ("hi there", "JSON object"),
                       ({"persona": "i like tea", "history": ["hi"]}, "list of strings"),
                       ({"persona": [], "history": []}, "at least one"), (["hi"], "object")]:
        with pytest.raises(HubError, match=words):
            task.parse_input(bad)
    chat = [{"role": "system", "content": "i like tea.\ni have a dog."}, {"role": "user", "content": "hi !"},
            {"role": "assistant", "content": "hello , how are you ?"}, {"role": "user", "content": "good ."},
            {"role": "user", "content": "and you ?"}]
    assert task.parse_chat(chat) == {"persona": ["i like tea.", "i have a dog."],
                                     "history": ["hi !", "hello , how are you ?", "good . and you ?"]}
    assert task.parse_input(task.parse_chat(chat)) == task.parse_chat(chat), "the engine parses the chat source again"
    with pytest.raises(HubError, match="end with"):
        task.parse_chat(chat[:3])
    with pytest.raises(HubError, match="role"):
        task.parse_chat([{"role": "tool", "content": "x"}, *chat])


# -- summarize ------------------------------------------------------------------------------------------------------

def test_summarize_frank_file_trains_on_400_tests_on_101():
    task = make_task("summarize")
    records = [json.loads(line) for line in FRANK.read_text().splitlines()]
    train, validation, test = (task.load_examples(str(FRANK), s) for s in ("train", "validation", "test"))
    assert len(train) + len(validation) == 400 and len(test) == 101 and 10 <= len(validation) <= 30
    assert {e.source for e in train + validation} == {r["article"].strip() for r in records[:400]}
    assert [(e.source, e.target) for e in test] == [(r["article"].strip(), r["reference"].strip())
                                                   for r in records[400:]]
    assert task.config() == {}


def test_summarize_finds_cnndm_and_xsum_fields(tmp_path, fake_hf):
    task = make_task("summarize")
    cnn = write_jsonl(tmp_path / "cnn.jsonl", [{"article": f"story {i}", "highlights": f"h {i}", "id": i}
                                               for i in range(10)])
    xsum = write_jsonl(tmp_path / "xsum.jsonl", [{"document": f"doc {i}", "summary": f"s {i}"} for i in range(10)])
    assert [(e.source, e.target) for e in task.load_examples(str(cnn), "test")] == [
        ("story 8", "h 8"), ("story 9", "h 9")]
    assert [(e.source, e.target) for e in task.load_examples(str(xsum), "test")] == [("doc 8", "s 8"), ("doc 9", "s 9")]
    own = write_jsonl(tmp_path / "own.jsonl", [{"text": f"t {i}", "abstract": f"a {i}"} for i in range(10)])
    with pytest.raises(HubError, match="article \\+ highlights"):
        task.load_examples(str(own), "train")
    named = make_task("summarize", {"input_field": "text", "target_field": "abstract"})
    assert named.load_examples(str(own), "test")[0].target == "a 8"
    assert named.config() == {"input_field": "text", "target_field": "abstract"}

    calls, rows = fake_hf
    rows["test"] = [{"article": "a", "highlights": "b", "id": "x"}]
    assert task.load_examples("cnn_dailymail", "test") == [Example("a", "b")]
    rows["test"] = [{"document": "d", "summary": "s", "id": "x"}]
    assert task.load_examples("xsum", "test") == [Example("d", "s")]
    assert calls == [("cnn_dailymail", "test", "3.0.0"), ("xsum", "test", None)]


def test_summarize_layout_caps_article_400_summary_130_and_fits_context(tokenizer):
    task = make_task("summarize")
    article = " ".join(f"word{n}" for n in range(600))
    summary = " ".join(f"sum{n}" for n in range(300))
    codec = codec_for(task, tokenizer, max_length=task.defaults.max_length)
    encoded = codec.encode_example(Example(article, summary), task.defaults.max_target_length)
    assert marker_names(codec, encoded.input_ids) == ["<bos_sm>", "<source_sm>", "<target_sm>", "<eos_sm>"]
    check_types_and_labels(codec, encoded)
    source_ids = encoded.input_ids[2:encoded.input_ids.index(codec.token_ids["<target_sm>"])]
    assert source_ids == tokenizer.encode(" " + article)[:400]
    assert sum(label != IGNORE_INDEX for label in encoded.labels) == 130 + 1
    assert len(encoded.input_ids) == task.defaults.max_length == 534
    small = codec_for(task, tokenizer, max_length=200)
    ids, types = small.encode_prompt(article, reserve=64)
    assert len(ids) + 64 == 200 and ids[2:-1] == tokenizer.encode(" " + article)[:200 - 64 - 3]
    assert task.parse_input("An article.") == "An article."
    with pytest.raises(HubError):
        task.parse_input("  ")


# -- translate ------------------------------------------------------------------------------------------------------

def test_translate_multi30k_folder_gz():
    task = make_task("translate")
    assert task.config() == {"source_lang": "en", "target_lang": "de"}
    test = task.load_examples(str(MULTI30K), "test")
    assert len(test) == 1000
    with gzip.open(MULTI30K / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        first_de = f.readline().strip()
    assert test[0] == Example("A man in an orange hat starring at something.", first_de)
    assert len(task.load_examples(str(MULTI30K), "validation")) == 1014
    assert len(task.load_examples(str(MULTI30K), "train")) == 29000
    reverse = make_task("translate", {"source_lang": "de", "target_lang": "en"}).load_examples(str(MULTI30K), "test")
    assert reverse[0] == Example(first_de, "A man in an orange hat starring at something.")


def test_translate_iwslt_folders():
    de_en = make_task("translate", {"source_lang": "de", "target_lang": "en"})
    train, validation = (de_en.load_examples(str(IWSLT14), s) for s in ("train", "validation"))
    assert len(train) + len(validation) == 7602 and 0 < len(validation) < 800  # valid.* trains, held-out part
    test = de_en.load_examples(str(IWSLT14), "test")
    assert len(test) == 6750 and test[0].target.startswith("you know , one of the intense pleasures")
    toy = make_task("translate")
    assert [len(toy.load_examples(str(IWSLT_TOY), s)) for s in ("train", "validation", "test")] == [1000, 20, 20]
    assert toy.load_examples(str(IWSLT_TOY), "test")[0] == Example("Well , good morning ladies and gentlemen .",
                                                                   "Ja, guten Tag meine Damen, meine Herren.")


def test_translate_plain_files_empty_lines_and_clear_errors(tmp_path):
    folder = tmp_path / "mt"
    folder.mkdir()
    (folder / "train.en").write_text("a cat\n\nthe dog\n  \nhello\n")
    (folder / "train.de").write_text("eine Katze\nleer\nder Hund\nleer\n\n")
    (folder / "test.en").write_text("one\n")
    (folder / "README.md").write_text("not a language\n")
    task = make_task("translate")
    assert task.load_examples(str(folder), "train") == [Example("a cat", "eine Katze"), Example("the dog", "der Hund")]
    with pytest.raises(HubError, match=r"expected test\.en and test\.de"):
        task.load_examples(str(folder), "test")
    with pytest.raises(NotFoundError, match="no validation file"):
        task.load_examples(str(folder), "validation")
    with pytest.raises(HubError, match=r"expected train\.en and train\.fr .*found: train\.de, train\.en"):
        make_task("translate", {"target_lang": "fr"}).load_examples(str(folder), "train")
    (folder / "test.de").write_text("eins\nzwei\n")
    with pytest.raises(HubError, match="align"):
        task.load_examples(str(folder), "test")
    with pytest.raises(HubError, match="source-lang"):
        make_task("translate", {"input_field": "en"})
    with pytest.raises(HubError, match="both"):
        make_task("translate", {"source_lang": "de", "target_lang": "DE"})


def test_translate_hf_rows_and_json_records(tmp_path, fake_hf):
    calls, rows = fake_hf
    rows["test"] = [{"translation": {"de": "Hallo Welt", "en": "Hello world"}},
                    {"translation": {"de": "", "en": "dropped"}}]
    en_de = make_task("translate")
    assert en_de.load_examples("wmt14", "test") == [Example("Hello world", "Hallo Welt")]
    assert make_task("translate", {"source_lang": "de", "target_lang": "en"}).load_examples(
        "iwslt2017", "test") == [Example("Hallo Welt", "Hello world")]
    assert calls == [("wmt14", "test", "de-en"), ("iwslt2017", "test", "iwslt2017-de-en")]
    make_task("translate").load_examples("my/wmt19:de-en", "test")
    assert calls[-1] == ("my/wmt19", "test", "de-en")
    rows["train"] = [{"translation": {"fr": "bonjour", "en": "hello"}}]
    with pytest.raises(HubError, match="'en' and 'de'"):
        en_de.load_examples("opus", "train")
    records = write_jsonl(tmp_path / "pairs.jsonl", [{"en": f"hello {i}", "de": f"hallo {i}"} for i in range(20)])
    train = en_de.load_examples(str(records), "train") + en_de.load_examples(str(records), "validation")
    assert sorted(e.source for e in train) == sorted(f"hello {i}" for i in range(20))


def test_translate_layout_caps_both_sides_at_100(tokenizer):
    task = make_task("translate")
    codec = codec_for(task, tokenizer, max_length=task.defaults.max_length)
    long_source = " ".join(["house"] * 150)
    encoded = codec.encode_example(Example(long_source, " ".join(["Haus"] * 150)), task.defaults.max_target_length)
    assert marker_names(codec, encoded.input_ids) == ["<bos_mt>", "<source_mt>", "<target_mt>", "<eos_mt>"]
    check_types_and_labels(codec, encoded)
    target_at = encoded.input_ids.index(codec.token_ids["<target_mt>"])
    assert target_at - 2 == 100 and len(encoded.input_ids) - target_at - 2 == 100
    assert len(encoded.input_ids) <= task.defaults.max_length == 204
    assert texts_between_markers(codec, codec.encode_example(Example("a cat", "eine Katze")).input_ids) == [
        "", "a cat", "eine Katze", ""]


# -- coqa -----------------------------------------------------------------------------------------------------------

def test_coqa_reads_the_official_json_and_splits_by_story():
    task = make_task("coqa")
    split = {s: task.load_examples(str(COQA_SAMPLE), s) for s in ("train", "validation", "test")}
    stories = {s: {e.source["id"] for e in examples} for s, examples in split.items()}
    assert stories["test"] == {"hub-coqa-0003"}
    assert stories["train"] | stories["validation"] == {"hub-coqa-0001", "hub-coqa-0002"}
    assert not stories["train"] & stories["validation"]
    every = [e for examples in split.values() for e in examples]
    assert len(every) == 18
    first = next(e for e in every if e.source["id"] == "hub-coqa-0001" and e.source["turn_id"] == 1)
    assert first.target == "in 1871" and first.source["history"] == []
    assert first.source["references"] == ["in 1871", "1871", "1871", "In 1871"]
    third = next(e for e in every if e.source["id"] == "hub-coqa-0002" and e.source["turn_id"] == 3)
    assert third.source["history"] == [["What color was Mina's bicycle?", "red"], ["Did it have a bell?", "yes"]]
    assert third.source["question"] == "Where did she ride it?" and third.source["references"] == ["to the market"]
    raw = json.loads(COQA_SAMPLE.read_text())
    assert raw["version"] == "1.0" and all(
        s["story"][a["span_start"]:a["span_end"]] == a["span_text"] for s in raw["data"] for a in s["answers"])


def test_coqa_reads_hf_rows(tmp_path, fake_hf):
    task = make_task("coqa")
    row = {"source": "mctest", "story": "Ann has a red kite. She flies it on Sundays.",
           "questions": ["What does Ann have?", "What color?", "When does she fly it?"],
           "answers": {"input_text": ["a kite", "red", "on Sundays"], "answer_start": [4, 10, 30],
                       "answer_end": [18, 13, 43]}}
    calls, rows = fake_hf
    rows["validation"] = [row]
    test = task.load_examples("stanfordnlp/coqa", "test")  # CoQA dev (HF validation) is the test split
    assert calls == [("stanfordnlp/coqa", "validation", None)]
    assert [(e.source["question"], e.source["history"], e.target) for e in test] == [
        ("What does Ann have?", [], "a kite"), ("What color?", [["What does Ann have?", "a kite"]], "red"),
        ("When does she fly it?", [["What does Ann have?", "a kite"], ["What color?", "red"]], "on Sundays")]
    rows["train"] = [dict(row, story=f"story {i}") for i in range(10)]
    assert len(task.load_examples("stanfordnlp/coqa", "train")) + len(
        task.load_examples("stanfordnlp/coqa", "validation")) == 30
    local = write_jsonl(tmp_path / "coqa.jsonl", [dict(row, story=f"story {i}") for i in range(5)])
    assert len(task.load_examples(str(local), "test")) == 3
    broken = write_jsonl(tmp_path / "broken.jsonl", [dict(row, story=f"s{i}", answers={"input_text": ["a"]})
                                                     for i in range(5)])
    with pytest.raises(HubError, match="one answer per question"):
        task.load_examples(str(broken), "test")
    with pytest.raises(HubError, match="missing field"):
        task.load_examples(str(write_jsonl(tmp_path / "q.jsonl", [{"story": "s"}] * 5)), "test")


def test_coqa_layout_document_then_q_a_q(tokenizer):
    task = make_task("coqa")
    codec = codec_for(task, tokenizer)
    source = {"story": "Ann has a red kite.", "history": [["What does Ann have?", "a kite"], ["What color?", "red"]],
              "question": "Does she fly it?"}
    encoded = codec.encode_example(Example(source, "yes"), task.defaults.max_target_length)
    assert marker_names(codec, encoded.input_ids) == [
        "<bos_qa>", "<document>", "<question>", "<answer>", "<question>", "<answer>", "<eos_qa>"]
    assert texts_between_markers(codec, encoded.input_ids) == [
        "", "Ann has a red kite.", "What color?", "red", "Does she fly it?", "yes", ""]
    check_types_and_labels(codec, encoded)
    two = codec_for(make_task("coqa", {"max_history": 2}), tokenizer).encode_example(Example(source, "yes"))
    assert marker_names(codec, two.input_ids)[1:-1] == ["<document>", "<question>", "<answer>", "<question>",
                                                        "<answer>", "<question>", "<answer>"]
    first = codec.encode_example(Example(dict(source, history=[]), "yes"))
    assert marker_names(codec, first.input_ids) == ["<bos_qa>", "<document>", "<question>", "<answer>", "<eos_qa>"]


def test_coqa_truncation_caps_document_at_400_and_fits_context(tokenizer):
    task = make_task("coqa")
    story = " ".join(f"fact{n}" for n in range(500))
    source = {"story": story, "history": [["q " * 80, "a " * 80]], "question": "why?"}
    codec = codec_for(task, tokenizer, max_length=task.defaults.max_length)
    ids, _ = codec.encode_prompt(source, reserve=50)
    at = [n for n, i in enumerate(ids) if i >= FIRST_ID]  # bos, document, question, answer, question, answer
    assert ids[at[1] + 1:at[2]] == tokenizer.encode(" " + story)[:400]
    assert [at[3] - at[2] - 1, at[4] - at[3] - 1] == [50, 50]
    assert len(ids) + 50 <= task.defaults.max_length
    small = codec_for(task, tokenizer, max_length=128)
    ids, _ = small.encode_prompt(source, reserve=20)
    at = [n for n, i in enumerate(ids) if i >= FIRST_ID]
    assert len(ids) + 20 == 128 and at[2] - at[1] == 2, "the story is cut first, down to one token"
    assert texts_between_markers(small, ids)[-2] == "why?"


def test_coqa_serving_input_and_chat():
    task = make_task("coqa")
    value = {"story": "Ann has a kite.", "history": [["What?", "a kite"]], "question": " Whose? "}
    assert task.parse_input(json.dumps(value)) == {"story": "Ann has a kite.", "history": [["What?", "a kite"]],
                                                   "question": "Whose?"}
    assert task.parse_input({"story": "s", "question": "q"})["history"] == []
    for bad, words in [(dict(value, question="  "), "question"), ({"history": [], "question": "q"}, "story"),
                       (dict(value, history=[["only a question"]]), "pairs"), ("not json", "JSON object"),
                       ([1, 2], "object")]:
        with pytest.raises(HubError, match=words):
            task.parse_input(bad)
    chat = [{"role": "system", "content": "Ann has a kite."}, {"role": "user", "content": "What?"},
            {"role": "assistant", "content": "a kite"}, {"role": "user", "content": "Whose?"}]
    assert task.parse_chat(chat) == {"story": "Ann has a kite.", "history": [["What?", "a kite"]], "question": "Whose?"}
    assert task.parse_chat([{"role": "user", "content": json.dumps(value)}])["question"] == "Whose?"
    with pytest.raises(HubError, match="alternate"):
        task.parse_chat(chat[:3])


# -- end to end ---------------------------------------------------------------------------------------------------

def hub_cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hub", *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_coqa_train_publish_generate(tiny_base, tmp_path):
    run, store = tmp_path / "run", tmp_path / "store"
    out = hub_cli("train", "coqa", "--base", tiny_base, "--data", COQA_SAMPLE, "--max-steps", "2", "--batch-size",
                  "2", "--grad-accum", "1", "--bottleneck", "16", "--device", "cpu", "--out", run)  # tiny d = 32
    assert "6 training / 6 held-out examples" in out.stdout
    hub_cli("publish", run, "--store", store)
    meta = json.loads(hub_cli("show", "coqa", "--store", store, "--json").stdout)
    assert meta["task_type"] == "coqa" and meta["task_config"] == {"max_history": 1} and meta["bottleneck"] == 16
    request = {"story": "Ann has a red kite. She flies it on Sundays.", "history": [], "question": "What color?"}
    answer = json.loads(hub_cli("generate", "--store", store, "--task", "coqa", json.dumps(request), "--json",
                                "--max-new-tokens", "6").stdout)
    assert answer["task"] == "coqa" and answer["finish_reason"] in ("stop", "length")
    assert 0 < answer["usage"]["completion_tokens"] <= 6 and answer["usage"]["prompt_tokens"] > 10
    bad = subprocess.run([sys.executable, "-m", "hub", "generate", "--store", str(store), "--task", "coqa",
                          json.dumps(dict(request, question=""))], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "question" in bad.stderr and "Traceback" not in bad.stderr
