"""The `compose` field of the generation routes: AdapterHub's `Average` or `Stack` over served adapters, per request
(`hub.serving.composition` checks and resolves it; `hub.adapters.vlm_compose` computes it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hub.serving.composition import MAX_ADAPTERS, Composition
from hub.serving.protocol import ServingBackend, TaskRef


class AverageMember(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., description="adapter name")
    weight: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="normalised over the members (sum 1)")


class Compose(BaseModel):
    """Exactly one block: `{"average": [{"task": "a", "weight": 0.7}, {"task": "b", "weight": 0.3}]}` (each layer's
    output is AdapterHub's `Average` of the adapters') or `{"stack": ["a", "b"]}` (b applied to a's output). The
    request's `task` (`model` on the OpenAI routes) names the member whose prompt layout and special tokens apply;
    every member's task must lay out prompts the same way."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"average": [{"task": "e2e", "weight": 0.7}, {"task": "e2e_style", "weight": 0.3}]},
        {"stack": ["translate", "summarize"]}]})

    average: list[AverageMember] | None = Field(None, min_length=2, max_length=MAX_ADAPTERS)
    stack: list[str] | None = Field(None, min_length=2, max_length=MAX_ADAPTERS)

    @model_validator(mode="after")
    def one_block(self) -> "Compose":
        if (self.average is None) == (self.stack is None):
            raise ValueError("'compose' takes exactly one of 'average' and 'stack'")
        return self

    def composition(self, layout: str | None) -> Composition:
        """The checked value (HubError, answered 422, for what the schema cannot say: repeats, the layout)."""
        if self.average is not None:
            return Composition.build("average", [m.task for m in self.average], [m.weight for m in self.average],
                                     layout)
        return Composition.build("stack", self.stack or [], layout=layout)


COMPOSE_DESCRIPTION = ("compose several adapters for this request, as AdapterHub's Average or Stack; "
                       "the request's task names the member whose prompt layout applies")


async def resolve(hub: ServingBackend, task: str | None, compose: Compose | None) -> TaskRef:
    """A route's task, or its composition (whose layout is `task`, else the first member), resolved once."""
    if compose is None:
        assert task is not None  # the request models require one of them
        return await hub.resolve(task)
    composition = compose.composition(task)
    return await hub.resolve(composition.layout, composition)
