"""The benchmark scripts run at tiny sizes on a CPU, so that they cannot rot (their figures come from
a GPU; nothing here is a timing)."""

import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def gpu_pretrain():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_pretrain

        yield gpu_pretrain
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_dense_bf16_peaks_by_device_name(gpu_pretrain):
    assert gpu_pretrain.peak_for_name("NVIDIA H200") == 989.0
    assert gpu_pretrain.peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_pretrain.peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert gpu_pretrain.peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_pretrain.peak_for_name("Tesla T4") is None


@pytest.mark.slow
def test_gpu_pretrain_tiny_on_cpu(gpu_pretrain, tmp_path, monkeypatch):
    """Every row of the GPU benchmark at tiny sizes. torch.compile is given dynamo's "eager" backend, so the
    compile rows run their code path (task.compile, the tokenizer's compile) without minutes of C++ builds."""
    real_compile = torch.compile

    def traced_only(model=None, **kwargs):
        kwargs.pop("mode", None)
        return real_compile(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", traced_only)
    threads = torch.get_num_threads()
    out = tmp_path / "table.md"
    try:
        gpu_pretrain.main(["--device", "cpu", "--tiny", "--workers", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    text = out.read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 9 and cells[2] not in ("images/s", "---"):
            rows[(cells[0], cells[1])] = cells
    configs = {config for _, config in rows}
    for switch in ("tokenizer fp16", "tokenizer bf16", "tokenizer fp16 + channels_last", "tokenizer compile (fp32)",
                   "model compile (task.compile)", "attention sdpa_efficient", "attention flex",
                   "peer: transformers, tokenizer fp32", "peer: transformers, tokenizer fp16"):
        assert switch in configs, switch
    assert any(c.startswith("all: tokenizer fp16 + channels_last + compile, model compile") for c in configs)
    assert any(c.startswith("BEiT-L") for c in configs) and any(part == "loader" for part, _ in rows)
    assert any(part == "loader" and "device_augment" in c for part, c in rows)
    parts = {part for part, _ in rows}
    assert parts == {"whole step", "model only", "tokenizer only", "loader"}
    for cells in rows.values():
        assert float(cells[2]) > 0, cells  # images/s measured for every row
    assert rows[("whole step", "peer: transformers, tokenizer fp32")][3] == "1.00x"
    assert rows[("model only", "peer: transformers")][3] == "1.00x"
    # the attention kernels agree with the math SDPA, bias-table gradient included (fp32)
    checks = re.findall(r"kernel check, (\w+) vs math SDPA.*?output (\S+), bias-table gradient (\S+), "
                        r"worst parameter gradient (\S+) ", text)
    assert {name for name, *_ in checks} == {"sdpa_efficient", "flex"}
    for _, *diffs in checks:
        assert all(float(d) < 1e-5 for d in diffs), checks
