"""The tasks the engine trains: each supplies what differs from the others (its data, model, loss,
metrics and evaluation) to :func:`mdeq.core.trainer.fit`."""
