"""What the ``tools/*.py`` programs run: one runner for every task (:mod:`mdeq.programs.runner`) and
each task's ``train`` / ``test`` programs (:mod:`mdeq.programs.classification`,
:mod:`mdeq.programs.segmentation`); the command line of the original scripts, process setup, exit
statuses for known failures, and the forward-budget sweep option."""
