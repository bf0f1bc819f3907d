"""The data owner's labelled texts: loading (:mod:`.datasets`), few-shot splits
(:mod:`.sampling`) and fixed-length tokenization (:mod:`.tokenize`).

Nothing is re-exported here so that importing the loaders does not import torch/transformers.
"""
