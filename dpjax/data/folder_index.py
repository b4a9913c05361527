"""The caption index of a ``folder:<dir>`` source: ``captions.jsonl`` or
``captions.csv``, one row per image file.

Read by ``sources.FolderSource`` at training time and by the folder reader
of ``python -m dpjax.prepare``, so both count and number rows alike.
"""

import csv
import json
import os
from typing import Any

# The key of an index row that did not parse; its value says why.
BAD_ROW = "_unparsed"


def read(directory: str) -> list[dict[str, Any]]:
  """The rows of a folder's ``captions.jsonl`` (or ``captions.csv``).

  A JSONL line that is not a JSON object is kept as ``{BAD_ROW: why}``, so
  row numbers stay those of the file.
  """
  jsonl = os.path.join(directory, "captions.jsonl")
  csv_path = os.path.join(directory, "captions.csv")
  if os.path.exists(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      return [_parse_jsonl(line, n)
              for n, line in enumerate(f, 1) if line.strip()]
  if os.path.exists(csv_path):
    with open(csv_path, encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f))
  raise FileNotFoundError(
      f"data.source='folder:{directory}' has no captions.jsonl or "
      "captions.csv: add one mapping each image file to its caption "
      '(JSONL lines {"file": "a.png", "caption": "...", "label": 0} or '
      "CSV with header file,caption[,label]).")


def _parse_jsonl(line: str, number: int) -> dict[str, Any]:
  try:
    row = json.loads(line)
  except ValueError as e:
    return {BAD_ROW: f"captions.jsonl line {number} is not JSON: {e}"}
  if not isinstance(row, dict):
    return {BAD_ROW: f"captions.jsonl line {number} is not a JSON object"}
  return row
