"""Train an MDEQ image classifier.

    python tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=2 tools/cls_train.py --cfg experiments/cifar/cls_mdeq_TINY.yaml

Exit status: 0 done, 2 bad input (one-line message), 3 diverged, 128+N stopped by signal N after
saving a checkpoint (resume with ``TRAIN.RESUME True``); see :mod:`mdeq.programs.cli`.
"""
from mdeq.programs.cli import tool_main
from mdeq.programs.classification import train


def main() -> None:
    tool_main(train)


if __name__ == "__main__":
    main()
