"""Evaluators on held-out data, built from big_vision-style config.

Each evaluator (linear_probe.py, few_shot.py, ...) is a small class built
from plain arrays + model functions, with `run(params) -> {prefix/metric:
float}`. A recipe supplies the functions and data (`Context`); `from_config`
builds `config.evals` = {name: {type, log_steps, ...fields}} from them
(types: `TYPES`, dpjax/evaluate/builders.py), and the training loop runs
each every `log_steps` steps and all at the end. Held-out data are public
unless the recipe marks them as derived from its private source
(`Context.private_data`): such evaluations are "private_eval/", not DP.
"""

from dpjax.evaluate import builders
from dpjax.evaluate import configured
from dpjax.evaluate import context

Context = context.Context
Scheduled = configured.Scheduled
TYPES = builders.TYPES
from_config = configured.from_config
