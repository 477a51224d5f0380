"""Bad input is a clear error before any training (no process group is created for these)."""
import pytest
import torch

from megatron.training.arguments import ConfigError, parse_args, validate_args
from megatron.training.training import Trainer
from tests.megatron.training.synthetic import VOCAB, documents, write_indexed


def _argv(data, *extra):
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--seq-length", "128", "--train-iters", "3", "--vocab-size", str(VOCAB), "--data-path", data,
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_indexed(str(tmp_path_factory.mktemp("d") / "docs"), documents(20, 2, 300, seed=0))


def _setup_error(argv, world=4, monkeypatch=None) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as info:
        Trainer(parse_args(argv)).setup()
    assert not torch.distributed.is_initialized()  # failed before any process group
    return str(info.value)


def test_unknown_backend_is_a_usage_error(data, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(_argv(data, "--cp-backend", "blockwise"))
    assert info.value.code == 2
    assert "invalid choice: 'blockwise'" in capsys.readouterr().err


def test_heads_not_divisible_by_head_parallel(data, monkeypatch):
    msg = _setup_error(_argv(data, "--cp-backend", "loongtrain", "--loongtrain-head-parallel", "3"), 3, monkeypatch)
    assert "num_heads (4) must be divisible by the head-parallel degree (3)" in msg


def test_world_not_nodes_times_devices(data, monkeypatch):
    for backend in ("dcp", "ring"):
        msg = _setup_error(_argv(data, "--cp-backend", backend, "--cp-devices-per-node", "3"), 4, monkeypatch)
        assert "world size 4 is not a multiple of devices_per_node=3" in msg and "nodes x devices_per_node" in msg


def test_missing_data_path(tmp_path, monkeypatch):
    msg = _setup_error(_argv(str(tmp_path / "nothing"), "--cp-backend", "zigzag"), 2, monkeypatch)
    assert "nothing.bin does not exist" in msg


def test_long_document_without_split_option(data, monkeypatch):
    msg = _setup_error(_argv(data, "--cp-backend", "zigzag"), 2, monkeypatch)
    assert "more than --seq-length=128" in msg and "--split-long-documents" in msg


def test_option_of_another_backend_and_foreign_mask_argument(data, monkeypatch):
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--dcp-block-size", "64"), 2, monkeypatch)
    assert "--dcp-block-size is an option of --cp-backend dcp" in msg
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--mask-window", "8"), 2, monkeypatch)
    assert "--mask-window is not an argument of mask 'causal'" in msg
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--cp-option", "bogus=1"), 2, monkeypatch)
    assert "unknown option(s) ['bogus']" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="Transformer Engine may run on a CUDA machine")
def test_backend_that_cannot_run_here(data, monkeypatch):
    msg = _setup_error(_argv(data, "--cp-backend", "te"), 2, monkeypatch)
    assert "--cp-backend te" in msg


def test_defaults_are_resolved():
    args = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length",
                       "256", "--train-iters", "5", "--mock-data", "ldc", "--vocab-size", "100", "--cp-backend",
                       "dcp", "--dcp-block-size", "auto", "--dcp-num-stages", "2", "--swiglu",
                       "--attention-mask", "lambda", "--mask-window", "16", "--mask-arg", "sink=2"])
    validate_args(args, world_size=8)
    assert args.num_query_groups == 8 and args.kv_channels == 8 and args.ffn_hidden_size == 128
    assert args.context_parallel_size == 8 and args.data_parallel_size == 1 and args.global_batch_size == 1
    assert args.backend_options == {"block_size": "auto", "num_stages": 2}
    assert args.mask_args == {"window": 16, "sink": 2}
    assert args.max_position_embeddings == 256 and args.dataset_name == "mock-ldc"


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 autocast is supported on CUDA")
def test_bf16_without_cuda(data, monkeypatch):
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--bf16", "--split-long-documents"), 2, monkeypatch)
    assert "--bf16 needs CUDA" in msg


def test_te_without_bf16_is_refused_at_setup(data, monkeypatch):
    msg = _setup_error(_argv(data, "--cp-backend", "te"), 2, monkeypatch)
    assert "--cp-backend te needs --bf16" in msg


def test_every_option_of_every_backend_is_a_flag():
    import dataclasses

    import dcp_backend as cp
    from megatron.training.arguments import build_parser

    flags = {a.dest: a for a in build_parser()._actions}
    for name in cp.available_backends():
        for f in dataclasses.fields(cp.make_options(name)):
            action = flags.get(f"{name}_{f.name}")
            assert action is not None, f"--{name}-{f.name.replace('_', '-')} is missing"
            assert f.metadata["help"] in action.help
    args = parse_args(["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "8",
                       "--train-iters", "1", "--vocab-size", "8", "--mock-data", "ldc", "--cp-backend", "dcp",
                       "--dcp-placement", "zigzag", "--dcp-block-size", "auto", "--dcp-cost-model", "cpu",
                       "--dcp-head-block-size", "1", "--dcp-compute-imbalance", "0.05"])
    validate_args(args, 1)
    assert args.backend_options == {"placement": "zigzag", "block_size": "auto", "cost_model": "cpu",
                                    "head_block_size": 1, "compute_imbalance": 0.05}
