"""Measurement for bam-triton (installed as ``bam_triton.bench``): sweeps, plots, AOT inspection, traffic model."""
