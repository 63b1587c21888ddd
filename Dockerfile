# zeros-lm on the official PyTorch CUDA image. Runs train.py by default.
#
#   docker build -t zeros-lm .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/zeros-lm/runs" zeros-lm
#   docker run --gpus all --ipc=host \
#       -v /path/to/corpus:/data:ro -v "$PWD/runs:/workspace/zeros-lm/runs" -v "$HOME/.cache/zeros_lm:/cache" \
#       zeros-lm --config configs/small.yaml --config configs/zero2.yaml --data.train_files "/data/**/*.txt"
#
# The "devel" flavour carries nvcc, which DeepSpeed needs to compile its ops (fused/CPU Adam,
# collectives) on first use; they are cached under /cache.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    ZEROS_LM_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions

WORKDIR /workspace/zeros-lm

# Dependencies first (the image's torch satisfies the package's torch range and is kept).
COPY pyproject.toml README.md ./
COPY zeros_lm ./zeros_lm
RUN pip install . "jsonargparse[signatures]>=4.27.7" tensorboard \
    && python -c "import zeros_lm, lightning, datasets, tokenizers; print('zeros-lm', zeros_lm.__version__)"

COPY train.py generate.py ./
COPY configs ./configs
COPY benchmarks ./benchmarks

VOLUME ["/cache"]
ENTRYPOINT ["python", "train.py"]
CMD []
