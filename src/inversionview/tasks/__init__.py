"""Built-in toy tasks: input generators in the paper's formats, position rules and feature annotations; and the
user's own tasks, named ``module:Class`` or ``module:function`` (:func:`get_task`)."""

from __future__ import annotations

import random

from ..errors import UserError
from .base import Task

__all__ = ["GeneratorTask", "Task", "get_task"]


class GeneratorTask(Task):
    """A user's own generator ``module:function`` (a function ``random.Random -> str``) as a task: its inputs, with
    query positions from ``[data] positions`` (every text position by default) and no moves, so its readings scan
    :attr:`draws` of its inputs as a data set (:mod:`inversionview.dataset`)."""

    sites = ()
    model: dict = {}
    draws = 20_000

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def generate(self, rng: random.Random) -> str:
        text = self.fn(rng)
        if not isinstance(text, str):
            raise UserError(f"generator {self.name!r} returned {type(text).__name__}, expected a str (one input)")
        return text


def get_task(name: str) -> Task:
    """A built-in task by name, or the user's own: ``module:Class`` (a :class:`Task` subclass, whose moves, features
    and strata readings use as the built-in tasks') or ``module:function`` (a generator: :class:`GeneratorTask`)."""
    from .addition import Addition
    from .counting import Counting
    from .ioi import Ioi

    tasks = {"counting": Counting, "addition": Addition, "ioi": Ioi}
    if ":" in name:
        from ..plugins import load_object

        obj = load_object(name, "task")
        if isinstance(obj, type) and issubclass(obj, Task):
            task = obj()
            task.name = name  # run.json names it so: the run loads it again
            return task
        if callable(obj) and not isinstance(obj, type):
            return GeneratorTask(name, obj)
        raise UserError(f"task {name!r} must be a subclass of inversionview.tasks.Task or a generator function")
    if name not in tasks:
        raise UserError(f"unknown task {name!r}: expected one of {', '.join(tasks)}, or module:Class / module:function")
    return tasks[name]()
