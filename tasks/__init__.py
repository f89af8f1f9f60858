"""One module per stage (prepare, train, evaluate, merge, register): ``run(cfg, paths) -> Result``.

Plain functions: no Prefect, no argv, no global state. ``flows/`` wraps them as Prefect tasks and
``loraflow stage NAME`` calls them for DVC.
"""
