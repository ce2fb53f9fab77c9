"""Task-error functions that know no toolkit (plain numpy / torch).

Each function takes arrays, tensors or lists and returns Python floats, so a
task can build its calibration objective and evaluation from them directly.
"""
from .classification import accuracy, classification_error, mean_average_precision
from .enhancement import mean_pesq, mean_stoi, pesq_score, stoi_score
from .spectral import mel_l1
from .text import (
    EditCounts,
    char_error_rate,
    edit_distance,
    normalize_text,
    word_error_rate,
)
from .verification import equal_error_rate, min_dcf

__all__ = [
    "EditCounts",
    "accuracy",
    "char_error_rate",
    "classification_error",
    "edit_distance",
    "equal_error_rate",
    "mean_average_precision",
    "mean_pesq",
    "mean_stoi",
    "mel_l1",
    "min_dcf",
    "normalize_text",
    "pesq_score",
    "stoi_score",
    "word_error_rate",
]
