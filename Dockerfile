# zeros-lm on the official PyTorch CUDA image. Runs train.py by default.
#
#   docker build -t zeros-lm .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/zeros-lm/runs" zeros-lm
#   docker run --gpus all --ipc=host \
#       -v /path/to/corpus:/data:ro -v "$PWD/runs:/workspace/zeros-lm/runs" -v "$HOME/.cache/zeros_lm:/cache" \
#       zeros-lm --config configs/small.yaml --config configs/zero2.yaml --data.train_files "/data/**/*.txt"
#
# The base is the official PyTorch CUDA image with torch 2.7.1: zeros-lm needs torch >= 2.6 (the
# floor of transformers 5.x; an older torch in the image would be kept by pip and the model classes
# would not import). Its "devel" flavour carries nvcc, which DeepSpeed needs to compile its ops
# (fused/CPU Adam, collectives) on first use; they are cached under /cache. CUDA 12.8 covers
# Ampere, Hopper and Blackwell GPUs.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    ZEROS_LM_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions

WORKDIR /workspace/zeros-lm

# Dependencies first (the image's torch satisfies the package's torch range and is kept). The build
# proves itself: zeros_lm.selfcheck imports the package (which checks the torch floor) and runs a
# tiny model of every attention type forward, on the CPU (no GPU is visible while building).
COPY pyproject.toml README.md ./
COPY zeros_lm ./zeros_lm
RUN pip install . "jsonargparse[signatures]>=4.27.7" tensorboard \
    && python -m zeros_lm.selfcheck

COPY train.py generate.py ./
COPY configs ./configs
COPY benchmarks ./benchmarks

VOLUME ["/cache"]
ENTRYPOINT ["python", "train.py"]
CMD []
