"""Data layer: synthetic/TFDS/ArrayRecord/folder sources, tokenizers,
numpy transforms, and Poisson-sampled Grain pipelines.

Import submodules: ``from dpjax.data import pipeline, sources, synthetic,
tokenizer, transforms, bad_records``.

Bad records (a file that is missing or does not decode, a caption with no
tokens) are handled in two places (docs/data.md): small sources are checked
in full before training (``bad_records.validate_phases``, which raises
``DataValidationError`` listing every problem); during training a record
that fails to load (``BadRecord``, or an ``OSError`` while reading or
transforming it) becomes a zero row (mask 0) and is reported only at the end
of the run, never at the step that drew it.
"""

# Why a record could not be used; index + 1 is the code in a batch's
# "bad_reason" leaf (0 = the row loaded). "other": a BadRecord raised by
# user code with a reason not in this list.
BAD_REASONS = ("missing_file", "missing_field", "read", "decode",
               "empty_caption", "other")


class BadRecord(Exception):
  """One record cannot be used: raised by sources and transforms.

  The Poisson pipelines turn it into a row that contributes exactly zero
  (like a padding row); start-up validation lists it. Raise it (not a bare
  ValueError) from your own transforms for data problems, so programming
  errors still fail loudly.

  Attributes:
    reason: one of ``BAD_REASONS`` ("missing_file", "missing_field", "read",
      "decode", "empty_caption"; anything else counts as "other").
  """

  def __init__(self, reason: str, message: str = ""):
    super().__init__(reason, message)
    self.reason, self.message = reason, message

  def __str__(self) -> str:
    return self.message or self.reason


class DataValidationError(ValueError):
  """Start-up validation found bad records (a data/config error: the run
  has not started; ``dpjax.main`` exits with status 2)."""


def reason_code(reason: str) -> int:
  """``BAD_REASONS`` index + 1 ("other" for unknown reasons)."""
  return 1 + (BAD_REASONS.index(reason) if reason in BAD_REASONS
              else BAD_REASONS.index("other"))
