# GPU image: CUDA PyTorch, flash-attn, Transformer Engine and apex (all shipped by NVIDIA's NGC PyTorch
# image, built against each other), then this project.
#
#   docker build -t dcp-megatron .
#   docker run --gpus all --ipc=host --rm -it dcp-megatron \
#       torchrun --nproc_per_node 8 tools/bench_attention.py --sanity-check
#
# Pick another NGC release with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 (TE >= 1.12 is
# needed for cp_comm_type a2a+p2p). The image keeps NGC's torch, flash-attn, TE and apex: reinstalling
# them from PyPI would replace CUDA builds that TE was compiled against, so the project is installed
# with --no-deps and its remaining (pure Python) dependencies under a constraint file that pins them.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/dcp-megatron

# Freeze the CUDA stack the base image ships so no later pip step can swap it out.
RUN python -m pip list --format=freeze \
        | grep -iE '^(torch|transformer[-_]engine[^=]*|flash[-_]attn|apex|nvidia-[^=]*)==' \
        > /etc/dcp-gpu-constraints.txt \
    && cat /etc/dcp-gpu-constraints.txt

# Should a base image lack one of the GPU packages (apex has been dropped from some NGC releases), build
# it here against the image's torch.
RUN python -c "import transformer_engine.pytorch" 2>/dev/null \
        || python -m pip install --no-build-isolation "transformer-engine[pytorch]>=1.12"; \
    python -c "import flash_attn" 2>/dev/null \
        || MAX_JOBS=8 python -m pip install --no-build-isolation "flash-attn>=2.6.3"; \
    python -c "import apex" 2>/dev/null \
        || python -m pip install -v --no-build-isolation --config-settings "--build-option=--cpp_ext" \
           --config-settings "--build-option=--cuda_ext" "git+https://github.com/NVIDIA/apex.git"

# Dependencies first (cached across source edits). Version pins match requirements-cpu.txt where the
# CPU and GPU worlds share a package; torch comes from the base image.
RUN python -m pip install -c /etc/dcp-gpu-constraints.txt \
        "megatron-core==0.16.1" "mtkahypar==1.7.post1" "sentencepiece==0.2.3" matplotlib tensorboard tqdm \
        "pytest==9.2.0"

COPY . .
# The `gpu` extra (flash-attn, transformer-engine[pytorch]) is satisfied by the base image.
RUN python -m pip install --no-deps --no-build-isolation -e . \
    && python -c "import torch, transformer_engine.pytorch, flash_attn, apex, megatron.core, dcp_backend; \
print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('transformer_engine', transformer_engine.__version__, 'flash_attn', flash_attn.__version__)"

CMD ["bash"]
