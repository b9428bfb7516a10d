"""``hydra/launcher=xmodal_slurm`` (``launcher=slurm``): xmodal's SLURM launcher, in
:mod:`hydra_plugins.xmodal_slurm._launcher`.

Hydra finds launchers by scanning the ``hydra_plugins`` namespace. The launcher needs the ``slurm``
extra (hydra-submitit-launcher): without it nothing is registered, the scan stays quiet, and
``launcher=slurm`` stops with the install hint.
"""

import importlib.util

if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from hydra_plugins.xmodal_slurm._launcher import (  # noqa: F401 - found by Hydra's scan
        XmodalSlurmLauncher,
        XmodalSlurmQueueConf,
        make_executor,
    )
