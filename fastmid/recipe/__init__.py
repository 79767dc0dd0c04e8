"""The recipe: ``fastmid train`` (config, data, batches, schedule, step, checkpoints, metrics,
trackers, distributed) and what a training run calls on its own: evaluation (``evaluate``,
``heldout``: train evaluates the base and the tuned model) and the ``--band auto`` chooser
(``bandgain`` with the sensitivity probe it offers as a criterion, ``probe``). It imports from
:mod:`fastmid.engine` and the shared leaves, never from :mod:`fastmid.study`."""
