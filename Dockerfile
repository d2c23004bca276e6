# vllm-seqkv on GPU nodes: the official vLLM OpenAI server image plus this plugin.
# Build: docker build -t vllm-seqkv .
# Run:   docker run --gpus all -p 8000:8000 -v /srv/models/your-model:/models/model:ro \
#          -v seqkv-cache:/cache vllm-seqkv
# At first start on a model the plugin calibrates it through vLLM (a subprocess, minutes) and
# writes the file to /cache/vllm-seqkv/calibration (the volume): later starts reuse it.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/vllm-seqkv
COPY pyproject.toml setup.py README.md ./
COPY vllm_seqkv ./vllm_seqkv
COPY csrc ./csrc

# vLLM and its CUDA torch come from the base image and already satisfy the requirements, so
# pip leaves them untouched. setup.py builds the csrc/ CUDA extension when nvcc is present
# (it is skipped with a message otherwise; the Triton kernels and torch path remain).
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN pip install --no-cache-dir --no-build-isolation .

# calibration files (and the lock that serialises concurrent first starts) live in a volume
ENV SEQKV_HOME=/cache/vllm-seqkv
VOLUME ["/cache"]

ENTRYPOINT ["vllm", "serve"]
CMD ["/models/model", "--kv-cache-backend", "seqkv", "--host", "0.0.0.0", "--port", "8000"]
