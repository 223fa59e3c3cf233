import json
import os
import subprocess
import sys

import pytest
import torch

import torchrec_tt


@pytest.mark.skipif(os.environ.get("TORCHREC_TT_EXPECT_CPP") != "1", reason="set by scripts/run_tests.sh after building")
def test_the_compiled_cpu_kernels_are_the_ones_under_test():
    # Guards against a suite that silently exercises only the reference kernels.
    assert torchrec_tt.HAS_CPP_KERNELS
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchrec_tt::tt_embedding_bag_backward_fused_", "CPU")


def test_info_cli_reports_kernels():
    out = subprocess.run([sys.executable, "-m", "torchrec_tt.info"], capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["cpp_kernels"] == torchrec_tt.HAS_CPP_KERNELS
    assert info["torch"] == torch.__version__


def test_disable_ext_env_falls_back_to_reference_kernels():
    code = "import torchrec_tt, torch; print(torchrec_tt.HAS_CPP_KERNELS); print(torchrec_tt.TTEmbeddingBag(10, 4, tt_ranks=[2, 2])(torch.tensor([1]), torch.tensor([0])).shape)"
    env = {**os.environ, "TORCHREC_TT_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split("\n")
    assert out[0] == "False" and out[1] == "torch.Size([1, 4])"
