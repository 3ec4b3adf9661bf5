"""Real files the tests read, fetched from the package registry on first use and cached (see
chipspan.assets): the Llama-2 tokenizer and LLaMA-Factory's demo datasets. Nothing is read from
beside the repository, so a fresh clone runs the whole suite."""

from chipspan import assets

LLAMA2_TOKENIZER = assets.fetch_llama2_tokenizer()
DEMO_DATA = assets.fetch_demo_datasets()
