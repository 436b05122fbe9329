"""ImageNet32 -> CIFAR-10 transfer (the reference library's ``experiments/imagenet``)."""
