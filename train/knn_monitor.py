"""The kNN monitor of `clsp train run --knn-every N`: the backbone's kNN accuracy on a labelled source."""
from __future__ import annotations

import numpy as np
import torch

from clsp.errors import UserError
from clsp.knn import knn_predict
from clsp.train.augment import DEFAULT_MEAN, DEFAULT_STD, EvalTransform
from clsp.train.backbones import embed


class KnnMonitor:
    """Weighted kNN top-1 in percent (k 20, cosine, T 0.07; as eval reports it) of the backbone on a labelled source:
    train split -> test split, at most `limit` images of each, spread over the split (sources.load_arrays; the bank
    holds labelled images only: STL-10's train split has 100,000 unlabelled ones)."""

    def __init__(self, spec: str, size: int, limit: int = 5000):
        from clsp.sources import NoLabelsError, OneSplitError, load_arrays, open_source

        try:
            self.bank = load_arrays(open_source(spec, "train", image_size=size), limit, labelled=True)[:2]
        except NoLabelsError as error:
            raise UserError(f"--knn-source: {error}, and the monitor's kNN bank needs labels: give a labelled "
                            f"source") from None
        try:
            test = open_source(spec, "test", image_size=size)
        except OneSplitError:  # its own message points to eval's --test-source, which training does not have
            raise UserError(f"--knn-source {spec} is one split (no file or folder named for train and test), and the "
                            f"monitor scores its test split against its train split: give a source with both, or "
                            f"drop --knn-every and --knn-source and score the finished run with `clsp eval knn RUN "
                            f"--test-source ...`") from None
        self.query = load_arrays(test, limit)[:2]
        self.transform = EvalTransform(size, DEFAULT_MEAN, DEFAULT_STD)

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, device: torch.device, k: int = 20, t: float = 0.07) -> float:
        was_training = backbone.training
        backbone.eval()
        bank, query = (embed(backbone, images, self.transform, 512, device) for images in (self.bank[0], self.query[0]))
        backbone.train(was_training)
        predicted = knn_predict(bank, self.bank[1], query, (k,), t, device=device)[min(k, len(bank))]  # (Q,)
        return float(np.mean(predicted == self.query[1], dtype=np.float32)) * 100.0
