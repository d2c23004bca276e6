# vllm-seqkv on GPU nodes: the official vLLM OpenAI server image plus this plugin.
# Build: docker build -t vllm-seqkv .
# Run:   docker run --gpus all -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#          vllm-seqkv --model HuggingFaceTB/SmolLM2-135M-Instruct
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/vllm-seqkv
COPY pyproject.toml setup.py README.md ./
COPY vllm_seqkv ./vllm_seqkv
COPY csrc ./csrc

# vLLM (and its CUDA torch) come from the base image; --no-deps keeps them untouched.
# setup.py builds the csrc/ CUDA extension because CUDA torch and nvcc are present here.
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip install --no-cache-dir "constriction>=0.4"

ENTRYPOINT ["vllm", "serve"]
CMD ["--kv-cache-backend", "seqkv", "--host", "0.0.0.0", "--port", "8000"]
