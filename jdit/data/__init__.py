"""Input pipelines: TFDS sources read by step, deterministic and resumable."""
from jdit.data.pipeline import (DATASETS, BucketedPipeline, DatasetSpec,
                                InputPipeline, get_spec, load_source,
                                make_pipeline)
from jdit.data import buckets
from jdit.data import folders  # registers folder32, ..., folder512_unlabeled
from jdit.data import imagenet  # registers imagenet64, ..., imagenet512
from jdit.data import latents  # registers imagenet_latents, ...

__all__ = ["DATASETS", "BucketedPipeline", "DatasetSpec", "InputPipeline",
           "buckets", "folders", "get_spec", "imagenet", "load_source", "latents",
           "make_pipeline"]
