"""chipspan: fine-tune Llama-family models spanned over several small accelerator chips."""

__version__ = "0.1.0"
