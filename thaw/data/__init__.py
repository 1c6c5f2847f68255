"""Data: images in, tensors prepared exactly as the weights expect."""

from thaw.data.transforms import eval_transform, train_transform

__all__ = ["eval_transform", "train_transform"]
