"""Few-shot task data for ``experiments.meta.train``: Omniglot (torchvision layout) and an embedded
task built from scikit-learn's digits.

A :class:`FewShotData` holds images as a float tensor ``X`` (N, d) and, per class, the indices of
its images; rotated copies (0°, 90°, 180°, 270°) are separate classes, as in the MAML literature.
:meth:`FewShotData.tasks` samples N-way k-shot tasks ``(x_support, y_support, x_query, y_query)``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from experiments.common import CLIError

__all__ = ["FewShotData", "load_digits_tasks", "load_omniglot", "SPLITS"]

SPLITS = ("val", "test")


class FewShotData:
    """Images ``X`` (N, d) float64 and ``classes``: a list of LongTensors of image indices, one per
    class (at least ``k + q`` images each for k-shot tasks with q queries)."""

    def __init__(self, name: str, X: Tensor, classes: list[Tensor]) -> None:
        self.name, self.X, self.classes = name, X, classes

    @property
    def d_in(self) -> int:
        return self.X.shape[1]

    def check(self, ways: int, shots: int, queries: int, what: str) -> None:
        """Raise :class:`CLIError` if tasks of this shape cannot be drawn."""
        if len(self.classes) < ways:
            raise CLIError(f"{what} ({self.name}) has {len(self.classes)} classes; --num-ways {ways} needs at least that many")
        smallest = min(len(c) for c in self.classes)
        if smallest < shots + queries:
            raise CLIError(
                f"{what} ({self.name}) has a class with {smallest} images; --num-shots {shots} + "
                f"--num-shots-test {queries} need {shots + queries}"
            )

    def task(self, ways: int, shots: int, queries: int, gen: torch.Generator) -> tuple[Tensor, ...]:
        """One task: ``ways`` random classes, relabelled 0..ways-1 in random order; ``shots``
        support and ``queries`` query images per class. Shapes (ways*shots, d), (ways*shots,),
        (ways*queries, d), (ways*queries,)."""
        picked = torch.randperm(len(self.classes), generator=gen)[:ways]
        xs, ys, xq, yq = [], [], [], []
        for label, c in enumerate(picked.tolist()):
            idx = self.classes[c]
            order = idx[torch.randperm(len(idx), generator=gen)[: shots + queries]]
            xs.append(self.X[order[:shots]])
            xq.append(self.X[order[shots:]])
            ys += [label] * shots
            yq += [label] * queries
        return torch.cat(xs), torch.tensor(ys), torch.cat(xq), torch.tensor(yq)

    def tasks(self, count: int, ways: int, shots: int, queries: int, gen: torch.Generator) -> list[tuple]:
        """``count`` tasks (a meta-batch)."""
        return [self.task(ways, shots, queries, gen) for _ in range(count)]


def _rotations(images: Tensor, labels: Tensor) -> tuple[Tensor, list[Tensor]]:
    # images (N, h, w), labels (N,) in 0..C-1 -> 4N flattened images and 4C classes (rotation-major).
    C = int(labels.max()) + 1 if len(labels) else 0
    out, classes = [], []
    for k in range(4):
        out.append(torch.rot90(images, k, dims=(1, 2)).reshape(len(images), -1))
    X = torch.cat(out)
    N = len(images)
    for k in range(4):
        for c in range(C):
            classes.append(torch.nonzero(labels == c).flatten() + k * N)
    return X, classes


def load_digits_tasks(split: str) -> tuple[FewShotData, FewShotData]:
    """The embedded few-shot task: scikit-learn's 1797 digits (8×8, standardised with the
    meta-training pixel mean and std) × 4
    rotations = 40 classes. Meta-train: digits 0-5 (24 classes); meta-test: digits 6-7
    (``split="val"``) or 8-9 (``"test"``), 8 classes each. No download."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64).reshape(-1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    held = (6, 7) if split == "val" else (8, 9)

    def subset(digits, name):
        keep = torch.isin(y, torch.tensor(digits))
        remap = {d: i for i, d in enumerate(digits)}
        labels = torch.tensor([remap[int(v)] for v in y[keep]])
        Xr, classes = _rotations(X[keep], labels)
        return FewShotData(name, Xr, classes)

    train, test = subset((0, 1, 2, 3, 4, 5), "digits 0-5"), subset(held, f"digits {held[0]}-{held[1]}")
    # Standardise with the meta-training pixels' statistics: raw [0, 1] pixels give nearly equal
    # cosines between all images, so an untrained π-net's 1-shot adaptation is near chance.
    mean, std = train.X.mean(0), train.X.std(0).clamp_min(1e-6)
    train.X, test.X = (train.X - mean) / std, (test.X - mean) / std
    return train, test


def load_omniglot(folder: str, split: str, progress: bool = False) -> tuple[FewShotData, FewShotData]:
    """Omniglot through ``torchvision.datasets.Omniglot(folder, background=..., download=False)``
    (``folder/omniglot-py/images_background`` and ``images_evaluation``): images resized to 28×28
    (values in [0, 1]), each character × 4 rotations a class. Meta-train: the background alphabets;
    meta-test: the evaluation alphabets, the first half of them (sorted) for ``split="val"``, the
    second half for ``"test"``. A missing folder is a :class:`CLIError` naming it."""
    from torchvision import datasets, transforms

    class _Omniglot(datasets.Omniglot):
        # torchvision's check wants the downloaded zip (md5) even when the extracted folder is
        # there; the extracted layout is what we read, so that is what we check.
        def _check_integrity(self) -> bool:
            return os.path.isdir(os.path.join(self.root, self._get_target_folder()))

    tf = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor()])
    sets = {}
    for background in (True, False):
        sub = "images_background" if background else "images_evaluation"
        where = os.path.join(folder, "omniglot-py", sub)
        try:
            sets[background] = _Omniglot(folder, background=background, transform=tf, download=False)
        except RuntimeError:
            raise CLIError(f"Omniglot not found: expected {where}/<alphabet>/<character>/*.png "
                           "(torchvision's Omniglot layout; nothing is downloaded)") from None
        if len(sets[background]) == 0:
            raise CLIError(f"Omniglot folder {where} holds no images")

    def build(ds, alphabets, name):
        chars = [i for i, c in enumerate(ds._characters) if c.split(os.sep)[0].split("/")[0] in alphabets]
        images, labels = [], []
        wanted = {c: j for j, c in enumerate(chars)}
        items = [(k, cls) for k, (_, cls) in enumerate(ds._flat_character_images) if cls in wanted]
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc=f"loading {name}", leave=False)
        for k, cls in items:
            img, _ = ds[k]
            images.append(img[0].double())
            labels.append(wanted[cls])
        if not images:
            raise CLIError(f"Omniglot {name}: no images")
        X, classes = _rotations(torch.stack(images), torch.tensor(labels))
        return FewShotData(f"omniglot {name}", X, classes)

    train = build(sets[True], set(sets[True]._alphabets), "background")
    evaluation = sorted(sets[False]._alphabets)
    half = max(1, len(evaluation) // 2)
    chosen = evaluation[:half] if split == "val" else evaluation[half:] or evaluation[:half]
    test = build(sets[False], set(chosen), f"evaluation ({split})")
    return train, test
