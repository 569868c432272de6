"""Sampling parameters: the one place a request's fields become `SamplingParams` (the token choice itself is
`hub.serving.output`).

Field names follow vLLM's (`min_tokens`, `ignore_eos`) so benchmarks and users can fix output lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hub.errors import HubError
from hub.store.format import is_int

DEFAULT_MAX_NEW_TOKENS = 64
MAX_TEMPERATURE = 5.0
SEED_LIMIT = 2**63  # torch generators take seeds below 2^64; JSON clients commonly handle signed 64-bit
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's and vLLM's limit)
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI)
MAX_REPETITION_PENALTY = 10.0
MAX_NGRAM = 32


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding; temperature 0 is greedy. Before `min_tokens` tokens neither EOS nor a stop
    string ends a sequence; with `ignore_eos` only length (or a stop string) does.

    `logprobs` asks for each generated token's log-probability and its top `logprobs` alternatives,
    `prompt_logprobs` the same for the prompt's tokens (OpenAI's `echo`); both None when not asked. The penalties
    (`hub.serving.penalties`) change the token choice, never the reported log-probabilities. `max_new_tokens` 0
    is allowed only with `prompt_logprobs` (score a prompt, generate nothing)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    client: str = ""  # who sent it (an API key's name): not sampling, carried with it to the runner's fairness
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.no_repeat_ngram_size)

    def validate(self) -> None:
        """Refuse any value that could make sampling raise inside a shared decode step."""
        least = 0 if self.prompt_logprobs is not None else 1
        if not is_int(self.max_new_tokens) or self.max_new_tokens < least:
            raise HubError("max_new_tokens must be a whole number of at least 1 (0 only with echo)")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (self.temperature, self.top_p)):
            raise HubError("temperature and top_p must be finite numbers")
        if not 0 <= self.temperature <= MAX_TEMPERATURE or not 0 < self.top_p <= 1 or not is_int(self.top_k) \
                or self.top_k < 0:
            raise HubError(f"need 0 <= temperature <= {MAX_TEMPERATURE:g}, 0 < top_p <= 1 and a whole top_k >= 0")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise HubError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise HubError(f"stop takes at most {MAX_STOP_STRINGS} strings, each 1 to {MAX_STOP_CHARS} characters")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise HubError(f"min_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                           f"not {self.min_tokens}")
        self._validate_logprobs_and_penalties()

    def _validate_logprobs_and_penalties(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise HubError(f"{name} must be a whole number from 0 to {MAX_LOGPROBS}, not {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _within(getattr(self, name), -MAX_PENALTY, MAX_PENALTY):
                raise HubError(f"{name} must be a number from {-MAX_PENALTY:g} to {MAX_PENALTY:g}")
        if not _within(self.repetition_penalty, 0.0, MAX_REPETITION_PENALTY) or self.repetition_penalty == 0:
            raise HubError(f"repetition_penalty must be above 0 and at most {MAX_REPETITION_PENALTY:g}")
        if not is_int(self.no_repeat_ngram_size) or not 0 <= self.no_repeat_ngram_size <= MAX_NGRAM:
            raise HubError(f"no_repeat_ngram_size must be a whole number from 0 to {MAX_NGRAM}")

    def may_stop(self, generated: int) -> bool:
        """Whether EOS or a stop string may end a sequence that has `generated` tokens so far."""
        return generated >= self.min_tokens


def _within(value: object, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value <= high


def sampling_params(default_max_new_tokens: int | None = None, *, max_new_tokens: int | None = None,
                    temperature: float | None = 0.0, top_p: float | None = 1.0, top_k: int | None = 0,
                    seed: int | None = None, stop: str | list[str] | tuple[str, ...] | None = None,
                    min_tokens: int | None = 0, ignore_eos: bool | None = False, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, presence_penalty: float | None = 0.0,
                    frequency_penalty: float | None = 0.0, repetition_penalty: float | None = 1.0,
                    no_repeat_ngram_size: int | None = 0) -> SamplingParams:
    """A request's fields (None: not given) -> validated `SamplingParams`; every route and the CLI use this.

    `default_max_new_tokens` is the task's default length (the engine's default for the plain base model);
    `max_new_tokens` 0 (with `prompt_logprobs`) scores the prompt only.
    """
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    length = max_new_tokens if max_new_tokens is not None else default_max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    params = SamplingParams(
        max_new_tokens=length,
        temperature=0.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        seed=seed,
        stop=stops,
        min_tokens=min_tokens or 0,
        ignore_eos=bool(ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size or 0,
    )
    params.validate()
    return params


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """A row's own random stream (reproducible with `seed`); None for greedy rows."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    return generator
