"""What every hibernation engine promises.

An engine turns a live kernel into files and back. Engines know nothing about
Jupyter servers: the provisioner and the hibernator above them decide when to
call them and what to do when they fail.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

# What a request may name: an engine, or "auto" for CRIU where it works, else dill.
ENGINE_CHOICES = ("auto", "criu", "dill")


@dataclass(frozen=True)
class Availability:
    """Whether an engine can run here, and if not, why and what to do."""

    ok: bool
    detail: str
    remedy: str = ""


class EngineError(RuntimeError):
    """An engine step failed. The message says which step and why."""


class Engine(ABC):
    """Base class of the hibernation engines, chosen by :attr:`name`."""

    name: ClassVar[str]

    @abstractmethod
    def availability(self) -> Availability:
        """Tell whether this engine can hibernate kernels on this machine.

        Must be cheap after the first call: front ends ask before every
        hibernation.
        """
