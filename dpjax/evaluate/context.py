"""What a recipe offers its evaluators: named functions and named data.

A recipe builds one `Context` and hands it, with `config.evals`, to
`evaluate.from_config`. Evaluator fields annotated `FnName` / `DataName`
(dpjax/evaluate/builders.py) name entries of it, e.g. `pred="features"`,
`train_data="probe"`; they are checked when the task is built, long before
anything is evaluated.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NewType

# Field types of evaluator builders: the value names a Context entry.
FnName = NewType("FnName", str)
DataName = NewType("DataName", str)


class Context:
  """Named model functions and lazily loaded held-out data: PUBLIC, except
  the data sets named in `private_data`.

  Attributes:
    recipe: the recipe's name (for error messages).
    fns: {name: function}. Common names and shapes: "features" (params,
      images[B, S, S, 3]) -> [B, D]; "logits" (params, images) -> [B, K];
      "loglik" (params, images, tokens int32[B, L]) -> [B];
      "caption_logits" (params, images, tokens) -> [B, L-1, V];
      "caption_loss" (params, images, tokens) -> [B]; "decode" (params,
      images) -> int[B, L_out]; "detokenize" int[L] -> str; "embed"
      (params, images) -> [B, D]; "mae_loss" (params, images, keys
      uint32[B, 2]) -> [B].
    seed: the run's config.seed (evaluators' own public randomness).
    private_data: names of data sets derived from the private training
      source (e.g. held-out users of it): an evaluation that reads one is
      not DP, so it is logged under "private_eval/" and never exported.
  """

  def __init__(self, recipe: str, fns: Mapping[str, Callable[..., Any]],
               data: Mapping[str, Callable[[], Mapping[str, Any]]],
               seed: int = 0, private_data: Iterable[str] = ()):
    """Args: recipe, fns, seed and private_data as above; data: {name:
    zero-arg loader -> {field: array [N, ...] or constant}}, each called at
    most once, when an evaluator that uses it is first built (never while
    the task is built)."""
    self.recipe, self.fns, self.seed = recipe, dict(fns), seed
    self._loaders, self._loaded = dict(data), {}
    self.private_data = frozenset(private_data)
    unknown = sorted(self.private_data - set(self._loaders))
    if unknown:
      raise ValueError(f"private_data {unknown} are not data sets of "
                       f"{recipe}: {sorted(self._loaders)}")

  def names(self, kind: type) -> list[str]:
    """Sorted names of the functions (FnName) or data sets (DataName)."""
    return sorted(self.fns if kind is FnName else self._loaders)

  def arrays(self, name: str) -> Mapping[str, Any]:
    """Data set `name`, loaded on first use and kept."""
    if name not in self._loaded:
      self._loaded[name] = self._loaders[name]()
    return self._loaded[name]
