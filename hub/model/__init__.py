"""The frozen GPT-2 and what is attached to it: loading, task-token rows, forward hooks."""
