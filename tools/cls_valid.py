"""Evaluate an MDEQ image classifier (our checkpoint or the original authors' .pkl) on the held-out set.

    python tools/cls_valid.py --cfg experiments/cifar/cls_mdeq_TINY.yaml --testModel pretrained_models/x.pkl
"""
from mdeq.core.cls_runner import valid


def main() -> None:
    valid()


if __name__ == "__main__":
    main()
