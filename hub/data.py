"""Reading task data: a local CSV/JSONL/JSON file, a folder of split files, or a Hugging Face dataset id.

Every source yields plain records (dicts). A folder's files are matched to splits by name (`train*`,
`dev*`/`valid*`/`val*`, `test*`); with no training file the validation file is trained on and a held-out
part of it (grouped, so related records stay together) becomes the validation split. A single file is
training data with a held-out validation part, and all of it is the test split when that is asked for
(`hub eval NAME --data test.jsonl`); a task may instead ask for its last part to be the test split.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Callable, Mapping

from hub.errors import HubError, NotFoundError

SPLITS = ("train", "validation", "test")
SPLIT_PATTERNS = {
    "train": re.compile(r"^train"),
    "validation": re.compile(r"^(dev|valid|val)"),
    "test": re.compile(r"^test"),
}
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
HOLDOUT_FRACTION = 0.05


def read_file(path: Path) -> list[dict]:
    """All records of one CSV, TSV, JSONL or JSON (a list of objects) file."""
    try:
        if path.suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [_json_record(line, path, n) for n, line in enumerate(f, 1) if line.strip()]
        if path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(records, dict) and "data" in records:
                records = records["data"]
            if not isinstance(records, list):
                raise HubError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
            return records
    except (UnicodeDecodeError, csv.Error) as err:
        raise HubError(f"{path}: cannot read it as {path.suffix[1:].upper()}: {err}") from None
    except json.JSONDecodeError as err:
        raise HubError(f"{path}: invalid JSON: {err}") from None
    raise HubError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _json_record(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise HubError(f"{path}, line {number}: invalid JSON: {err}") from None
    if not isinstance(record, dict):
        raise HubError(f"{path}, line {number}: expected a JSON object")
    return record


def split_files(folder: Path, suffixes: tuple[str, ...] = FILE_SUFFIXES) -> dict[str, Path]:
    """Match a folder's data files to splits; for several candidates the longest name wins
    (`testset_w_refs.csv` over `testset.csv`, since the longer name is the one with references)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name)):
        if path.suffix not in suffixes:
            continue
        for split, pattern in SPLIT_PATTERNS.items():
            if pattern.match(path.name.lower()):
                found[split] = path
    return found


def holdout(records: list[dict], group: Callable[[dict], str], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split off ~5 % of the groups (at least one) as held-out records."""
    keys = sorted({group(r) for r in records})
    if len(keys) < 2:
        raise HubError("too little data to hold out a validation part; provide a separate validation file")
    random.Random(seed).shuffle(keys)
    held = set(keys[: min(len(keys) - 1, max(1, round(len(keys) * HOLDOUT_FRACTION)))])
    return [r for r in records if group(r) not in held], [r for r in records if group(r) in held]


def ordered_split(records: list, split: str, group: Callable, test_fraction: float) -> list:
    """One body of data in its order: the first ⌊(1 − test_fraction)·n⌋ of its n groups are trained on, with a
    held-out validation part (`holdout`); the rest (at least one group) is the test split. 501 records with
    0.2 -> 400 and 101; 1,000 -> 800 and 200."""
    keys = list(dict.fromkeys(group(r) for r in records))
    if len(keys) < 3:
        raise HubError("too little data to split into train, validation and test parts")
    n_train = min(len(keys) - 1, int(len(keys) * (1 - test_fraction) + 1e-9))
    test_keys = set(keys[n_train:])
    if split == "test":
        return [r for r in records if group(r) in test_keys]
    train, validation = holdout([r for r in records if group(r) not in test_keys], group)
    return train if split == "train" else validation


def pick_fields(record: dict, fields: tuple[str, ...] | list[tuple[str, ...]]) -> tuple[str, ...]:
    """`fields`, or from a list of alternative field sets the first that `record` has (else the first)."""
    if isinstance(fields, tuple):
        return fields
    return next((f for f in fields if all(name in record for name in f)), fields[0] if fields else ())


def load_records(
    data: str,
    split: str,
    fields: tuple[str, ...] | list[tuple[str, ...]] = (),
    group: Callable[[dict], str] = lambda r: json.dumps(r, sort_keys=True),
    hf_config: str | None = None,
    test_fraction: float | None = None,
) -> list[dict]:
    """Records of `split` from a local file, a folder or an HF dataset id, each checked to have `fields` (or, for
    a list of alternative field sets, one of them). With `test_fraction`, a single file also has a test split:
    its last part (`ordered_split`)."""
    if split not in SPLITS:
        raise HubError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(data).expanduser()

    def check(records: list[dict], where: str | Path) -> list[dict]:
        require_fields(records, fields, where)
        return records

    if path.is_file():
        if test_fraction is not None:
            return ordered_split(check(read_file(path), path), split, group, test_fraction)
        return _split_one_file(check(read_file(path), path), split, group)
    if path.is_dir():
        return _split_folder(path, split, group, check)
    if _looks_like_path(data):
        raise NotFoundError(f"data not found: {data!r} is neither a file nor a folder")
    return check(_load_hf(data, split, hf_config), f"{data} ({split})")


def _looks_like_path(data: str) -> bool:
    return data.startswith((".", "/", "~")) or Path(data).suffix in FILE_SUFFIXES or data.count("/") > 1


def _split_one_file(records: list[dict], split: str, group) -> list[dict]:
    """Training: the file less a held-out part, which is the validation split. Test: the whole file (a file given
    to `hub eval` is the test data)."""
    if split == "test":
        return records
    train, validation = holdout(records, group)
    return train if split == "train" else validation


def _split_folder(folder: Path, split: str, group, check) -> list[dict]:
    files = split_files(folder)
    parts = {name: (lambda path=path: check(read_file(path), path)) for name, path in files.items()}
    return split_parts(parts, split, group, folder, [p.name for p in files.values()])


def split_parts(parts: Mapping[str, Callable[[], list]], split: str, group, where, found: list[str]) -> list:
    """The folder rule over a folder's split parts (split name -> reader): a split's own part; with no training
    part, the validation part is trained on and a held-out part of it is the validation split."""
    if split in parts and not (split == "validation" and "train" not in parts):
        return parts[split]()
    if split in ("train", "validation") and "validation" in parts:
        train, validation = holdout(parts["validation"](), group)
        return train if split == "train" else validation
    raise NotFoundError(f"{where}: no {split} file (expected a name starting with "
                        f"{SPLIT_PATTERNS[split].pattern[1:]}; found: {', '.join(found) or 'none'})")


def _load_hf(name: str, split: str, config: str | None) -> list[dict]:
    """An HF hub dataset (needs network, or the local HF cache)."""
    import datasets  # slow import, only when needed

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types: offline, missing, bad config
        raise HubError(
            f"cannot load dataset {name!r} split {split!r} from the Hugging Face hub ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Offline, pass a local file or folder with --data."
        ) from None
    return [dict(row) for row in dataset]


def require_fields(records: list[dict], fields: tuple[str, ...] | list[tuple[str, ...]], where) -> None:
    """A clear error when there are no records or they lack a needed column."""
    if not records:
        raise HubError(f"{where}: no records")
    if not isinstance(records[0], dict):
        raise HubError(f"{where}: expected records (JSON objects), got {type(records[0]).__name__}")
    missing = [f for f in pick_fields(records[0], fields) if f not in records[0]]
    if missing:
        expected = "" if isinstance(fields, tuple) else " (expected one of: " + "; ".join(
            " + ".join(f) for f in fields) + ")"
        raise HubError(f"{where}: missing field(s) {missing}{expected}; found {sorted(records[0])}")


TEXT_SPLIT_PATTERNS = {split: re.compile(rf"(^|[._-]){pattern.pattern[1:]}")
                       for split, pattern in SPLIT_PATTERNS.items()}
SENTENCE_FIELDS = ("text", "sentence")


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, stripped (one sentence per line)."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise HubError(f"{path}: not UTF-8 text: {err}") from None


def load_sentences(data: str, split: str) -> list[str]:
    """One sentence per line: a `.txt` file (a held-out part of it is the validation split), a folder of
    `*train*`/`*valid*`/`*test*` `.txt` files (`ptb.train.txt`, `valid.txt`; the folder rule of `split_parts`),
    or an HF dataset with a `text` or `sentence` column."""
    if split not in SPLITS:
        raise HubError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(data).expanduser()
    if path.is_file():
        if split == "test":
            raise HubError(f"{path} is a single file; pass a folder with a test file for the test split")
        train, validation = holdout([{"text": s} for s in read_lines(path)], lambda r: r["text"])
        return [r["text"] for r in (train if split == "train" else validation)]
    if path.is_dir():
        files: dict[str, Path] = {}
        for file in sorted(path.glob("*.txt"), key=lambda p: (len(p.name), p.name)):
            for name, pattern in TEXT_SPLIT_PATTERNS.items():
                if pattern.search(file.name.lower()):
                    files.setdefault(name, file)
        parts = {name: (lambda file=file: [{"text": s} for s in read_lines(file)]) for name, file in files.items()}
        records = split_parts(parts, split, lambda r: r["text"], path, [f.name for f in files.values()])
        return [r["text"] for r in records]
    if _looks_like_path(data):
        raise NotFoundError(f"data not found: {data!r} is neither a file nor a folder")
    records = _load_hf(data, split, None)
    field = pick_fields(records[0] if records else {}, [(f,) for f in SENTENCE_FIELDS])[0]
    require_fields(records, (field,), f"{data} ({split})")
    return [str(r[field]).strip() for r in records if str(r[field]).strip()]
