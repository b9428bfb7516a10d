"""``hydra/launcher=xmodal_slurm`` (``launcher=slurm``): xmodal's SLURM launcher,
:mod:`xmodal.cli._slurm`.

Hydra finds launchers by scanning the ``hydra_plugins`` namespace, so this module makes the
launcher visible there. It needs the ``slurm`` extra (hydra-submitit-launcher); without it nothing
is registered, the scan stays quiet, and ``launcher=slurm`` stops with the install hint.
"""

import importlib.util

if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from xmodal.cli._slurm import (  # noqa: F401 - registered by Hydra's plugin scan
        XmodalSlurmLauncher,
        XmodalSlurmQueueConf,
        make_executor,
    )
