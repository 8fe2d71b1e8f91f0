"""The training engine shared by every task: the loop (:mod:`.trainer`), checkpoints and resume
(:mod:`.checkpoint_manager`, :mod:`.state`), bad-step and epoch health policies (:mod:`.step_guard`,
:mod:`.health`), signals, Jacobian regularisation, and the losses and metrics the tasks use."""
