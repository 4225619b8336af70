"""Sampling pipelines: FlaxDDPMPipeline reads, runs and writes diffusers DDPMPipeline folders."""

from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline, FlaxImagePipelineOutput

__all__ = ["FlaxDDPMPipeline", "FlaxImagePipelineOutput"]
