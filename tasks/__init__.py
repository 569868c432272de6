"""The task registry: one module per task type, all subclasses of `hub.task.Task`."""

from __future__ import annotations

from typing import Any

from hub.errors import NotFoundError
from hub.task import Task
from tasks.coqa import CoQATask
from tasks.e2e import E2ETask
from tasks.lm import LMTask
from tasks.persona import PersonaTask
from tasks.summarize import SummarizeTask
from tasks.text2text import Text2TextTask
from tasks.translate import TranslateTask

TASK_TYPES: dict[str, type[Task]] = {
    cls.type_name: cls for cls in (E2ETask, Text2TextTask, PersonaTask, SummarizeTask, TranslateTask, CoQATask, LMTask)
}


def task_type(name: str) -> type[Task]:
    if name not in TASK_TYPES:
        raise NotFoundError(f"unknown task type {name!r}; available: {', '.join(sorted(TASK_TYPES))}")
    return TASK_TYPES[name]


def make_task(name: str, config: dict[str, Any] | None = None) -> Task:
    """A task object from its type name and stored options (as in an adapter's metadata)."""
    return task_type(name)(**(config or {}))
