"""Training data: the dataset registry, formats, prompt templates, encoding and batching.

``load_examples`` turns ``--dataset`` names into ``Example``s; ``collate`` batches them.
"""

from chipspan.data.collate import collate
from chipspan.data.encode import IGNORE_INDEX, Example
from chipspan.data.loader import load_examples

__all__ = ["IGNORE_INDEX", "Example", "collate", "load_examples"]
