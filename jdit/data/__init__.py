"""Input pipelines: TFDS sources read by step, deterministic and resumable."""
from jdit.data.pipeline import (DATASETS, DatasetSpec, InputPipeline, get_spec,
                                load_source)
from jdit.data import imagenet  # registers imagenet64, ..., imagenet512
from jdit.data import latents  # registers imagenet_latents, ...

__all__ = ["DATASETS", "DatasetSpec", "InputPipeline", "get_spec",
           "imagenet", "load_source", "latents"]
