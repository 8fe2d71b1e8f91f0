"""Train an MDEQ for Cityscapes semantic segmentation.

    python tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml [KEY VALUE ...]
    torchrun --nproc_per_node=4 tools/seg_train.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml
    python -m torch.distributed.launch --nproc_per_node=4 tools/seg_train.py --cfg ...

``MODEL.PRETRAINED``: an ImageNet classification checkpoint (ours or the original's ``.pkl``) whose
stem and equilibrium stage initialise the net (its classification head is dropped);
``TRAIN.MODEL_FILE``: a segmentation checkpoint loaded in full; ``TRAIN.RESUME``: continue from
``<output>/checkpoint.pth.tar``.

Exit status: 0 done, 2 bad input (one-line message), 3 diverged, 128+N stopped by signal N
(see :mod:`mdeq.programs.cli`).
"""
from mdeq.programs.cli import tool_main
from mdeq.programs.segmentation import train


def main() -> None:
    tool_main(train)


if __name__ == "__main__":
    main()
