"""Summarization (VLM "summarization"): a news article -> its summary.

Layout: `<bos_sm> <source_sm> article <target_sm> summary <eos_sm>`; the article is capped at 400 BPE tokens and
cut further from its end when the context is short; the summary at 130 (VLM). Data: CNN/DailyMail
(`article`/`highlights`, HF `cnn_dailymail` config 3.0.0), XSum (`document`/`summary`, HF `xsum`), or a file with
`article`/`reference` (the FRANK subset); other names with `--input-field`/`--target-field`. A single file is
split in order: train on its first 80 % (a held-out part of it validates), test on the rest (FRANK: 400 / 101).
"""

from __future__ import annotations

from hub.task import TaskDefaults
from tasks.source_target import SourceTargetTask

SOURCE_MAX_TOKENS, TARGET_MAX_TOKENS = 400, 130


class SummarizeTask(SourceTargetTask):
    type_name = "summarize"
    description = "summarization: article -> summary (CNN/DailyMail, XSum)"
    special_tokens = ("<bos_sm>", "<eos_sm>", "<source_sm>", "<target_sm>")
    source_marker, target_marker = "<source_sm>", "<target_sm>"
    field_pairs = (("article", "highlights"), ("document", "summary"), ("article", "reference"))
    source_max_tokens = SOURCE_MAX_TOKENS
    hf_configs = {"cnn_dailymail": "3.0.0", "abisee/cnn_dailymail": "3.0.0"}
    single_file_test_fraction = 0.2
    # VLM: b 100, 4 x 8, 10 epochs, lr 5e-4; the context holds BOS + 2 markers + 400 + 130 + EOS = 534 tokens.
    defaults = TaskDefaults(bottleneck=100, lr=5e-4, epochs=10, batch_size=4, grad_accum=8,
                            max_length=3 + SOURCE_MAX_TOKENS + TARGET_MAX_TOKENS + 1,
                            max_target_length=TARGET_MAX_TOKENS, max_new_tokens=TARGET_MAX_TOKENS)
    metric = "rouge"
    truncates_input = True  # VLM: the article is capped at 400 tokens; a response says how many were cut
