"""Evaluate an MDEQ image classifier (our checkpoint or the original authors' .pkl) on the held-out set.

    python tools/cls_valid.py --cfg experiments/cifar/cls_mdeq_TINY.yaml --testModel pretrained_models/x.pkl

Checkpoints are read with ``weights_only=True``: a file that would run code when unpickled is
refused (exit status 2, one-line message), never executed.
"""
from mdeq.programs.cli import tool_main
from mdeq.programs.classification import test


def main() -> None:
    tool_main(test)


if __name__ == "__main__":
    main()
