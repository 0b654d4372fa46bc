"""The attention kernel setting: torch's choice or one forced backend, checked before any model loads."""

import pytest
import torch
import torch.nn.functional as F

from mvdit.runtime import sdpa
from mvdit.workflow.experiment import ExperimentError


def test_auto_reports_the_kernel_torch_picks_and_forcing_math_is_honoured():
    q = torch.randn(1, 4, 64, 16)
    auto = sdpa.resolve("auto", 4, 16, torch.float32, "cpu")
    assert auto == sdpa.kernel_name(q, q, q) and auto in {"flash", "math"}  # the CPU kernels
    assert sdpa.resolve("math", 4, 16, torch.float32, "cpu") == "math"
    with sdpa.backend("math"):
        assert sdpa.kernel_name(q, q, q) == "math"
        forced = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(forced, F.scaled_dot_product_attention(q, q, q), rtol=1e-5, atol=1e-5)


def test_a_backend_the_device_lacks_is_a_one_line_error_naming_the_file_and_the_fix():
    with pytest.raises(ExperimentError) as e:
        sdpa.resolve("cudnn", 4, 16, torch.float32, "cpu", source="experiments/x.yaml")
    msg = str(e.value)
    assert msg.startswith("experiments/x.yaml: infer.sdpa_backend: cudnn cannot run float32 attention on cpu")
    assert "set it to auto" in msg and "\n" not in msg
    # and the context really constrains SDPA: cuDNN alone cannot run on the CPU
    q = torch.randn(1, 4, 64, 16)
    with sdpa.backend("cudnn"), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ValueError, match="unknown SDPA backend 'fast'"):
        sdpa.backend("fast")
