"""Fixtures borrowed from the training and reference suites: the pydoc corpus, the tiny training config, and the
transformers 4.57.6 runner."""

from tests.reference.conftest import reference_python, reference_runner  # noqa: F401
from tests.training.conftest import pydoc_dataset, tiny_dict  # noqa: F401
