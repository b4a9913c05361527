"""dpjax: differentially private pretraining of vision and vision-language models.

`import dpjax.privacy` is the stand-alone DP core (optax transforms, sampling,
accounting); the rest of the package (models, data, train, recipes, evaluate)
is imported on demand so that the privacy core stays light.
"""

__version__ = "0.1.0"
