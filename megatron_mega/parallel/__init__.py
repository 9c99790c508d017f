"""Pipeline parallelism for MEGA with DeepSpeed: layer specs from the model's own layers, name maps both ways."""

from megatron_mega.parallel.dist_setup import disable_shm_comm
from megatron_mega.parallel.layout import (
    NameRule,
    PipelineLayout,
    hf_name_to_pipeline,
    hf_state_to_pipeline,
    pipeline_layout,
    pipeline_name_to_hf,
    pipeline_state_to_hf,
)
from megatron_mega.parallel.partition import PARTITION_METHODS, describe_partition, stage_partition
from megatron_mega.parallel.pipeline import (
    build_pipeline_module,
    check_pipeline_compatible,
    gather_pipeline_state,
    layer_specs,
    plain_from_pipeline_state,
    plain_model,
    plain_model_from_pipeline_checkpoint,
    read_pipeline_checkpoint,
    to_plain_model,
)

__all__ = [
    "NameRule", "PARTITION_METHODS", "PipelineLayout", "build_pipeline_module", "check_pipeline_compatible",
    "describe_partition", "disable_shm_comm", "gather_pipeline_state", "hf_name_to_pipeline", "hf_state_to_pipeline",
    "layer_specs", "pipeline_layout", "pipeline_name_to_hf", "pipeline_state_to_hf", "plain_from_pipeline_state",
    "plain_model", "plain_model_from_pipeline_checkpoint", "read_pipeline_checkpoint", "stage_partition",
    "to_plain_model",
]
