"""Data: loading local files and datasets, format checks, tokenisation, sampling."""

from posttrain.data.loading import Row, load_rows, split_train_eval
from posttrain.data.sampler import GlobalBatchSampler

__all__ = ["GlobalBatchSampler", "Row", "load_rows", "split_train_eval"]
