"""What a run that ran out of GPU memory tells its user: the setting of its own method."""

import pytest
import torch

from afina.core.job_config import ConfigRequest, resolve_config
from afina.worker.job_runner import as_failure
from tests.support import job_row


@pytest.mark.parametrize("method", ["supervised", "dpo"])
def test_out_of_memory_names_the_batch_size_of_the_job_s_method(method):
    config = resolve_config(
        ConfigRequest.model_validate({"method": {"type": method}}),
        num_examples=10,
        model_max_length=512,
    )
    job = job_row(config=config.model_dump(mode="json"))
    failure = as_failure(torch.OutOfMemoryError("CUDA out of memory"), job)
    assert (failure.code, failure.param) == (
        "out_of_memory",
        f"method.{method}.hyperparameters.batch_size",
    )
