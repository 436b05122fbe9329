"""The reference library's CIFAR-10 π-MLP command, with the same flags and meanings::

    python -m experiments.cifar10.cifar10mlp --lr 1.0 --gclip-per-param --gclip 0.4 --lr-drop-ratio 0.15 \\
        --lr-drop-milestones 40 --scheduler multistep --wd 0.00001 --r 400 --batch-size 8 --epochs 50 \\
        --width 0 --cuda --seed 0 --depth 2 --bias-alpha 0.5 --first-layer-lr-mult 0.1 \\
        --last-layer-lr-mult 4.0 --first-layer-alpha 1.0 --last-layer-alpha 0.5 --no-apply-lr-mult-to-wd \\
        --save-dir ./output/

(on CPU drop ``--cuda`` and add ``--float``, as the reference README says). On a multi-GPU node,
``torchrun --standalone --nproc-per-node 8 -m experiments.cifar10.cifar10mlp --pi-rank 400 ...``
(the same flags, ``--pi-rank`` for ``--r``: torchrun's parser refuses ``--r``) shards every
π-layer's rows over the 8 processes, one GPU each (docs/distributed.md). The data is
torchvision's ``CIFAR10(root=--data, download=False)``: put the extracted ``cifar-10-batches-py/``
under ``--data`` (or pass ``--download`` where there is network access). Images are normalised
with the reference's per-channel mean/std and flattened to 3072 features.
"""

from __future__ import annotations

import argparse
import os

from experiments.common import CLIError, DatasetData, add_training_args, cli

# The reference tutorial's normalisation constants.
MEAN = [0.49137255, 0.48235294, 0.44666667]
STD = [0.24705882, 0.24352941, 0.26156863]
_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]

DEFAULTS = dict(r=400, depth=1, batch_size=8, epochs=50, lr=1.0, test_batch_size=1000, save_dir="")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag of the reference command, same meanings)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar10.cifar10mlp",
        description="Train an infinite π-MLP (--width 0) or a finite π-MLP (--width N) on CIFAR-10, as the "
        "reference library's experiments/cifar10/cifar10mlp.py. --depth is the number of hidden π-layers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_args(p, DEFAULTS, default_precision="half")
    data = p.add_argument_group("data")
    data.add_argument("--data", type=str, default="./data",
                      help="directory containing cifar-10-batches-py/ (torchvision's CIFAR10 root)")
    data.add_argument("--download", action="store_true",
                      help="let torchvision download CIFAR-10 into --data (needs network)")
    data.add_argument("--data-augment", action="store_true",
                      help="random crop (padding 4) and horizontal flip of training images")
    p.add_argument("--human", action="store_true",
                   help="human-readable progress: a tqdm bar per epoch (off by default: 50000-image epochs "
                        "make long log files)")
    return p


def _data(args) -> DatasetData:
    try:
        import torch
        from torchvision import datasets, transforms
    except ImportError as e:  # pragma: no cover - torchvision is a declared dependency of [experiments]
        raise CLIError(f"torchvision is needed for CIFAR-10 ({e}); pip install -e '.[experiments]'") from None
    folder = os.path.join(args.data, "cifar-10-batches-py")
    if not args.download:
        missing = [f for f in _FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            if os.path.isdir(folder):
                what = f"{folder} lacks {', '.join(missing)}"
            else:
                what = f"no directory {folder}"
            raise CLIError(
                f"CIFAR-10 not found: {what}. This command does not download by "
                "default: extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into "
                f"{os.path.abspath(args.data)}, point --data at the directory that contains "
                "cifar-10-batches-py/, "
                "or add --download on a machine with network access"
            )
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    aug = []
    if args.data_augment:
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    try:
        train = datasets.CIFAR10(
            root=args.data, train=True, download=args.download, transform=transforms.Compose(aug + norm)
        )
        test = datasets.CIFAR10(root=args.data, train=False, transform=transforms.Compose(norm))
    except RuntimeError as e:
        msg = f"CIFAR-10 in {folder} failed torchvision's checks ({e}); re-extract cifar-10-python.tar.gz"
        raise CLIError(msg) from None
    except OSError as e:  # download failures (no network, DNS, HTTP errors)
        msg = f"could not download CIFAR-10 into {args.data}: {e}; download it elsewhere and extract it there"
        raise CLIError(msg) from None
    if args.train_subset:
        train = torch.utils.data.Subset(train, range(min(args.train_subset, len(train))))
    if args.test_subset:
        test = torch.utils.data.Subset(test, range(min(args.test_subset, len(test))))
    return DatasetData("CIFAR-10", train, test, d_in=3 * 32 * 32, num_classes=10)


def main(argv: list[str] | None = None) -> None:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); user errors exit 2 with one line."""
    cli(build_parser(), argv, _data, progress=lambda a: a.human)


if __name__ == "__main__":
    main()
