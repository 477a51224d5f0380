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


def _setup_error(argv, world=4, monkeypatch=None, cp_size=None) -> str:
    """The ConfigError of a setup at ``world`` ranks (CP over all of them unless ``cp_size`` is given)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if "--context-parallel-size" not in argv:
        argv = [*argv, "--context-parallel-size", str(cp_size or world)]
    with pytest.raises(ConfigError) as info:
        Trainer(parse_args(argv)).setup()
    assert not torch.distributed.is_initialized()  # failed before any process group
    return str(info.value)


def test_unknown_backend_or_flag_is_a_one_line_usage_error(data, capsys):
    for bad, expected in ((("--cp-backend", "blockwise"), "invalid choice: 'blockwise'"),
                          (("--cp-backend", "ring", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
                          (("--cp-backend", "dcp", "--dcp-refetch", "maybe"), "expected true or false, got 'maybe'")):
        with pytest.raises(SystemExit) as info:
            parse_args(_argv(data, *bad))
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err  # one line, no usage dump


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
                       "--attention-mask", "lambda", "--mask-window", "16", "--mask-arg", "sink=2",
                       "--dcp-refetch", "false"])
    validate_args(args, world_size=8)
    assert args.num_query_groups == 8 and args.kv_channels == 8 and args.ffn_hidden_size == 128
    # Megatron-LM's defaults: no tensor/pipeline/context parallelism, so 8 ranks are 8 data-parallel replicas.
    assert args.context_parallel_size == 1 and args.data_parallel_size == 8 and args.global_batch_size == 8
    assert args.backend_options == {"block_size": "auto", "num_stages": 2, "refetch": False}
    assert args.mask_args == {"window": 16, "sink": 2}
    assert args.max_position_embeddings == 256 and args.dataset_name == "mock-ldc"


@pytest.mark.skipif(torch.cuda.is_available(), reason="16-bit training runs on CUDA")
def test_16_bit_and_cuda_only_flags_without_cuda(data, monkeypatch):
    for flag in ("--bf16", "--fp16", "--use-distributed-optimizer", "--overlap-grad-reduce"):
        msg = _setup_error(_argv(data, "--cp-backend", "ring", flag, "--split-long-documents"), 2, monkeypatch)
        assert f"{flag} need" in msg and "CUDA" in msg, msg
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--sequence-parallel", "--tensor-model-parallel-size", "2"),
                       2, monkeypatch, cp_size=1)
    assert "--sequence-parallel needs CUDA" in msg


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


def test_megatron_layout_and_its_checks(data, monkeypatch):
    """world = tp x pp x cp x dp (Megatron-LM's defaults: 1, 1, 1); heads and groups split over TP."""
    args = parse_args(_argv(data, "--cp-backend", "dcp", "--tensor-model-parallel-size", "2",
                            "--context-parallel-size", "2", "--global-batch-size", "4"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    validate_args(args, world_size=8)
    assert (args.data_parallel_size, args.num_micro_batches) == (2, 2)
    # TP is innermost: the CP group of rank 0 is ranks 0 and 2, both on the one node of 8 ranks.
    assert args.cp_topology.world_size == 2 and args.cp_topology.devices_per_node == 2
    from megatron.training.model import attention_spec

    spec = attention_spec(args)
    assert (spec.num_heads, spec.num_kv_heads) == (2, 1)  # local heads of one TP rank
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--tensor-model-parallel-size", "4"), 4, monkeypatch,
                       cp_size=1)
    assert "--tensor-model-parallel-size 4 must divide" in msg and "--num-query-groups (2)" in msg
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--tensor-model-parallel-size", "2"), 6, monkeypatch,
                       cp_size=2)
    assert "world size 6 is not a multiple of" in msg
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--pipeline-model-parallel-size", "2"), 4, monkeypatch,
                       cp_size=2)
    assert msg.startswith("--pipeline-model-parallel-size 2 is not supported") and "\n" not in msg
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--micro-batch-size", "2"), 2, monkeypatch)
    assert "a micro-batch here is one packed sequence of whole documents" in msg


def test_cp_topology_of_a_strided_group(monkeypatch):
    """TP 4 x CP 16 on 8 nodes of 8: a CP group has 2 members per node (the published 8B layout)."""
    from megatron.training.initialize import cp_group_ranks, cp_topology

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cp_group_ranks(64, 4, 1, 16, rank=5) == list(range(1, 64, 4))
    topo = cp_topology(64, 4, 1, 16)
    assert (topo.world_size, topo.devices_per_node, topo.nodes) == (16, 2, 8)
    assert cp_topology(64, 4, 1, 16, devices_per_node=4).nodes == 4  # --cp-devices-per-node overrides
    import dcp_backend as cp

    with pytest.raises(cp.CPError, match="unevenly"):
        cp.Topology.of_group([0, 1, 2, 9], ranks_per_node=8)
    with pytest.raises(cp.CPError, match="consecutive"):
        cp.Topology.of_group([0, 8, 1, 9], ranks_per_node=8)


def test_megatron_flags_we_do_not_implement(data, monkeypatch, capsys):
    """Ignored flags print one line each and training goes on; unsupported ones stop it with one line."""
    args = parse_args(_argv(data, "--cp-backend", "ring", "--use-flash-attn", "--attention-backend", "auto",
                            "--data-cache-path", "/tmp/x", "--use-mcore-models"))
    assert [line.split(":")[0] for line in args.ignored_flags] == ["--use-flash-attn", "--attention-backend",
                                                                   "--data-cache-path", "--use-mcore-models"]
    assert args.cp_backend == "ring"  # the values of ignored flags were consumed, nothing else
    msg = _setup_error(_argv(data, "--cp-backend", "ring", "--num-experts", "8", "--recompute-activations"), 2,
                       monkeypatch)
    assert msg.startswith("--num-experts is not supported: mixture of experts") and "--recompute-activations" in msg


def test_schedule_and_data_flags(tmp_path, data):
    weighted = write_indexed(str(tmp_path / "other"), documents(10, 2, 50, seed=1))
    args = parse_args(_argv(data, "--cp-backend", "ring", "--lr-warmup-fraction", "0.1", "--lr-decay-iters", "50",
                            "--adam-beta1", "0.8", "--adam-beta2", "0.99", "--init-method-std", "0.01",
                            "--use-cpu-initialization", "--split", "90,5,5") + ["--data-path", "0.3", data, "0.7",
                                                                                weighted])
    validate_args(args, world_size=1)
    assert args.lr_warmup_iters == 5 and args.split == "90,5,5"
    from megatron.training.datasets import parse_data_path

    assert parse_data_path(args.data_path) == ([data, weighted], [0.3, 0.7])
    assert args.tokenizer_type == "NullTokenizer"  # --vocab-size alone
    args = parse_args(_argv(data, "--cp-backend", "ring"))
    validate_args(args, world_size=1)
    assert args.split == "969,30,1"  # Megatron-LM's default
    with pytest.raises(ConfigError, match="give one of --lr-warmup-fraction and --lr-warmup-iters"):
        validate_args(parse_args(_argv(data, "--cp-backend", "ring", "--lr-warmup-fraction", "0.1",
                                       "--lr-warmup-iters", "2")), 1)


def test_tokenizers(tmp_path, data):
    """NullTokenizer and SentencePiece through megatron-core; GPT-2 BPE from its vocab.json."""
    import json

    from megatron.training.tokenizer import build_vocabulary

    def vocab(*extra):
        args = parse_args(_argv(data, "--cp-backend", "ring", *extra))
        validate_args(args, 1)
        return build_vocabulary(args)

    v = vocab()
    assert (v.size, v.eod) == (VOCAB + 1, VOCAB)  # megatron's NullTokenizer: EOD after the ids
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    v = vocab("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "vocab.json"),
              "--merge-file", str(tmp_path / "merges.txt"))
    assert (v.size, v.eod) == (3, 2)
    import sentencepiece as spm

    text = [f"document {i} says hello world and def f(x): return x + {i}" for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "spm"), vocab_size=60,
                                   eos_id=2, bos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
    v = vocab("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "spm.model"))
    assert (v.size, v.eod) == (60, 2)
    with pytest.raises(ConfigError, match="needs --vocab-file"):
        vocab("--tokenizer-type", "GPT2BPETokenizer")
