"""The :paper presets' TFDS evaluation and public sources exist under the
names they give and read through the recipes' own code paths.

``tfds.testing.mock_data`` patches ``tfds.data_source`` (the ArrayRecord
random-access path ``sources.make_source("tfds:...")`` uses) with random
records of each dataset's real features: a name missing from the TFDS
catalogue still fails, a missing or renamed field fails in the recipe's
transforms, and nothing is downloaded (no TensorFlow needed).

DP-Cap's and ViP's :paper probes read ImageNet-1k (``imagenet2012``);
their held-out caption / MAE losses read ``data.eval_source``. DP
continual's ImageNet-21k-P held-out split and DP-FedEmb's held-out writers
are prepared ArrayRecord directories (tests/prepare/prepare_*_test.py test
that path).
"""

import importlib

import numpy as np
import pytest

from configs import dp_continual as continual_config
from configs import dpfedemb as fedemb_config
from dpjax import recipes
from dpjax.data import arrays
from dpjax.data import transforms
from dpjax.recipes import dp_continual
from dpjax.recipes import dpfedemb_data

tfds = pytest.importorskip("tensorflow_datasets")

_NUM = 3  # Records read per source.


def _continual_paper(**overrides):
  c = continual_config.get_config("paper")
  c.update_from_flattened_dict(overrides)
  return c


def _read_continual(config, source_field: str, split_field: str,
                    labels: tuple[str, ...]) -> dict[str, np.ndarray]:
  """``continual.eval_arrays`` as its evaluators / monitor call it."""
  spec = config[source_field.split(".")[0]][source_field.split(".")[1]]
  split = config[split_field.split(".")[0]][split_field.split(".")[1]]
  assert spec.startswith("tfds:"), spec
  with tfds.testing.mock_data(num_examples=_NUM):
    return dp_continual.eval_arrays(spec, config, split=split, num=_NUM,
                                    labels=labels)


@pytest.mark.parametrize("source_field,split_field", [
    ("data.probe_source", "data.probe_train_split"),
    ("data.probe_source", "data.probe_test_split"),
])
def test_continual_paper_eval_sources(source_field, split_field):
  config = _continual_paper()
  probe = source_field.startswith("data.probe_")
  labels = tuple(config.data.probe_labels.split(",")) if probe else (
      "label",)
  out = _read_continual(config, source_field, split_field, labels)
  assert out["image"].shape == (_NUM, 224, 224, 3)
  assert out["image"].dtype == np.float32
  assert np.abs(out["image"]).max() <= 1.0
  for k in labels:
    assert out[k].shape == (_NUM,) and np.issubdtype(out[k].dtype,
                                                     np.integer)


def test_imagenet2012_reads_as_continual_eval_and_probe_data():
  """The TFDS ImageNet-1k: labelled held-out data is its "validation"
  split ("test" has no labels), 1,000 classes under "label"."""
  config = _continual_paper(**{
      "data.eval_source": "tfds:imagenet2012",
      "monitor.split": "validation[:256]",
      "data.probe_source": "tfds:imagenet2012",
      "data.probe_test_split": "validation"})
  for source, split in (("data.eval_source", "data.eval_split"),
                        ("data.eval_source", "monitor.split"),
                        ("data.probe_source", "data.probe_train_split"),
                        ("data.probe_source", "data.probe_test_split")):
    out = _read_continual(config, source, split, ("label",))
    assert out["image"].shape == (_NUM, 224, 224, 3)
    assert ((0 <= out["label"]) & (out["label"] < 1000)).all()
  assert tfds.builder("imagenet2012").info.features["label"].num_classes == (
      1000)


def test_fedemb_paper_public_source_reads_mnist_without_a_user_field():
  config = fedemb_config.get_config("paper")
  assert config.data.public_source == "tfds:mnist" and config.data.user_key
  with tfds.testing.mock_data(num_examples=_NUM):
    src = dpfedemb_data.public_source(config)
    ts = dpfedemb_data.transforms(config, "label")
    rec = transforms.apply(ts, dict(src[0]),
                                         np.random.default_rng(0))
  size = config.data.image_size
  assert rec["image"].shape == (size, size, 3)  # grey -> RGB.
  assert 0 <= int(rec["label"]) < config.data.public_num_classes


@pytest.mark.parametrize("name", ["dpcap", "vip"])
def test_dpcap_and_vip_paper_probes_read_imagenet2012(name):
  """The :paper probe data (train split's first records, labelled
  "validation") through `arrays.labelled_images`, and the recipe's own
  linear-probe evaluator built from it (its data is loaded at build)."""
  c = importlib.import_module(f"configs.{name}").get_config("paper")
  d = c.data
  assert d.probe_source == "tfds:imagenet2012" and d.probe_labels == "label"
  for split in (d.probe_train_split, d.probe_test_split):
    with tfds.testing.mock_data(num_examples=_NUM):
      out = arrays.labelled_images(
          d.probe_source, split=split, num=_NUM, image_size=d.image_size,
          labels=("label",), data_dir=d.probe_data_dir)
    assert out["image"].shape == (_NUM, 224, 224, 3)
    assert ((0 <= out["label"]) & (out["label"] < 1000)).all()
  # Training data stood in (only the probe is under test).
  c.data.source = "synthetic:shapes"
  if name == "dpcap":
    c.data.tokenizer = f"shapes:{c.model.vocab_size}"
  task = recipes.get(name).build(c)
  with tfds.testing.mock_data(num_examples=_NUM):
    assert task.evaluators["linear_probe"].evaluator() is not None
