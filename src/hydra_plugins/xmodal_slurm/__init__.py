"""Shadow of /work/main/src/hydra_plugins/xmodal_slurm for wt-cir test runs (main is mid-merge)."""
