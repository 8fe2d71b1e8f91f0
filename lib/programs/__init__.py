"""What the ``tools/*.py`` programs run: the command line of the original scripts, process setup,
exit statuses for known failures, and the forward-budget sweep option."""
