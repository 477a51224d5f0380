"""tools/gpu_verify.py without a GPU: one clear line and a non-zero exit; with --allow-cpu its kernel and
distributed checks run on CPU (eager flex forward, gloo) and pass, and a wrong kernel makes them fail."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_verify  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the tool would run its checks")
def test_without_cuda_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_verify.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "CUDA is needed" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_kernel_checks_pass_and_catch_a_wrong_kernel(monkeypatch):
    rep = gpu_verify.Report()
    gpu_verify.kernel_section(rep, torch.device("cpu"), quick=True)
    checks = [r for r in rep.rows if r[1].startswith("flex ")]
    assert len(checks) == 3 and all(r[2] == "ok" for r in checks) and not rep.failed

    from dcp_backend.kernels.flex import FlexKernel

    real = FlexKernel.forward

    def off_by_a_bit(self, q, k, v, work, scale):
        out, lse = real(self, q, k, v, work, scale)
        return out * 1.01, lse

    monkeypatch.setattr(FlexKernel, "forward", off_by_a_bit)
    rep = gpu_verify.Report()
    gpu_verify.kernel_section(rep, torch.device("cpu"), quick=True)
    assert rep.failed and all(r[2] == "FAILED" for r in rep.rows if r[1].startswith("flex "))


def test_oracle_matches_the_reference_kernel_forward_and_backward():
    from dcp_backend.kernels import get_kernel

    work = gpu_verify.random_work(np.random.default_rng(3), max_len=200)
    q, k, v, do = gpu_verify.tensors(work, 4, 2, 16, torch.float64, torch.device("cpu"), seed=1)
    out, lse, dq, dk, dv = gpu_verify.oracle(q, k, v, do, work, 0.3, chunk=37)
    ref = get_kernel("reference")
    o2, l2 = ref.forward(q, k, v, work, 0.3)
    g2 = ref.backward(do, q, k, v, o2, l2, work, 0.3)
    assert gpu_verify.rel(out, o2) < 1e-12 and gpu_verify.rel(lse, l2) < 1e-12
    for a, b in zip((dq, dk, dv), g2):
        assert gpu_verify.rel(a, b) < 1e-10


def test_distributed_checks_run_every_backend_on_gloo():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_verify.py"), "--allow-cpu", "--quick",
                           "--sections", "dist", "--gpus", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for name in ("ring", "zigzag", "loongtrain", "dcp"):
        assert any(line.startswith("dist") and f" {name} small ragged" in line and " ok " in line
                   for line in proc.stdout.splitlines()), proc.stdout


def test_flash_row_says_why_it_did_not_run_and_stage_works_are_all_flash_segments():
    rep = gpu_verify.Report()
    gpu_verify.flash_section(rep, torch.device("cpu"), quick=True)
    assert len(rep.rows) == 1 and rep.rows[0][1].startswith("flash") and rep.rows[0][2] == "-"
    assert "not checked" in rep.rows[0][3] and not rep.failed
    from dcp_backend.kernels.flash import split_work

    sp = split_work(gpu_verify.stage_work(np.random.default_rng(0)))
    assert sp.general is None and sum(p.segments.size for p in sp.flash) >= 3
