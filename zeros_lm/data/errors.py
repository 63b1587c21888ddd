"""The one error type of the data pipeline."""

class DataError(ValueError):
    """A problem with the training data or the tokenizer, found before training starts."""


__all__ = ["DataError"]
