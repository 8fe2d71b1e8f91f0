"""Train an MDEQ image classifier.

    python tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=2 tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml
"""
from mdeq.core.cls_runner import train


def main() -> None:
    train()


if __name__ == "__main__":
    main()
