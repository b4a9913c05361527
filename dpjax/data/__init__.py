"""Data layer: synthetic/TFDS/ArrayRecord/folder sources, tokenizers,
numpy transforms, and Poisson-sampled Grain pipelines.

Import submodules: ``from dpjax.data import pipeline, sources, synthetic,
tokenizer, transforms``.
"""
