"""Evaluate a Cityscapes MDEQ, or write benchmark predictions for the test list.

    python tools/seg_test.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml --testModel path/to/final_state.pth
    python tools/seg_test.py --cfg ... --testModel ... DATASET.TEST_SET list/cityscapes/test.lst

A labelled list (val) gives per-class IoU, mIoU, pixel accuracy and mean solver steps (logged and
written to ``<output>/<list>_results.json``) and, under ``<output>/<list>_results/``, colour-coded
predictions (``color/``), overlays on the input (``overlay/``) and label-id images
(``label_ids/``). An unlabelled list (test) gives the label-id images the benchmark server
expects, named like the input images (``<city>_<seq>_<frame>_leftImg8bit.png``), and colour images.

Exit statuses as for every tool (:mod:`mdeq.programs.cli`): 0 done, 2 bad input (one-line message),
128+N stopped by signal N.
"""
from mdeq.programs.cli import tool_main
from mdeq.programs.segmentation import test


def main() -> None:
    tool_main(test)


if __name__ == "__main__":
    main()
