"""Errors a user can cause. The CLI prints them as one line and exits non-zero; anything else is a bug."""

from typing import Any


def first_error(exc: Any) -> str:
    """The first problem of a pydantic ValidationError as one line: `field.path: message`."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class ApmError(Exception):
    """Base class for errors caused by input (options, files, catalogs), never by the code itself."""


class CatalogError(ApmError):
    """A catalog folder or file is missing or does not validate."""


class ConfigError(ApmError):
    """A run option or config file is invalid."""


class CacheError(ApmError):
    """The call cache cannot be used: a folder or foreign file at its path, damaged, read-only, or
    on a full disk."""


class PromptFileError(ApmError):
    """A prompt file or conversation file is missing or malformed."""


class QuestionFileError(ApmError):
    """A benchmark question file (MMLU-Pro, TruthfulQA, BBQ) is missing, malformed or empty."""


class UnknownNameError(ApmError):
    """A name (method, model, backend) is not registered."""


class InformationBarrierError(ApmError):
    """A method asked for something it must never see (feedback or targets for a test user)."""


class UninformativeFeedbackError(ApmError):
    """The judge's ratings of the training users' candidates tell none of them apart (every rating
    failed, or a constant judge): a method that learns from feedback has nothing to learn from, and
    the run says so instead of reporting a meaningless Δ."""

    def __init__(self, method: str, what: str) -> None:
        super().__init__(f"{method}: {what}; the judge rated every candidate alike or not at all "
                         "(check the judge model, its failed ratings, or --judge-temperature)")
