# dwave's container image: CPU (default) and CUDA variants from this one file.
#
#   podman build -t dwave:cpu .                                   # or docker build
#   podman build --build-arg FLAVOUR=gpu -t dwave:gpu .
#   apptainer build dwave.sif container/dwave.def                 # from the built image
#
# Python 3.11 (Debian 12's), TensorFlow 2.15.1 from the hashed lock file, Horovod 0.28.1 built
# with MPI and Gloo (NCCL too in the gpu variant) against the image's Open MPI, and dwave's fused
# CPU kernels prebuilt for a portable x86-64 level (MARCH). Where no registry can be reached,
# make the base from Debian's packages first (container/base-image.sh) and pass
# --build-arg BASE=localhost/debian:bookworm-slim. The README's "Install elsewhere" has the rest.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ARG FLAVOUR=cpu
ARG MARCH=x86-64-v3
# The CUDA toolkit the gpu variant's Horovod compiles its NCCL operations with: NVIDIA's Debian
# 12 repository, the version TensorFlow 2.15's pip-installed CUDA libraries are (12.2).
ARG CUDA_REPO=https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64
ARG CUDA_VERSION=12-2

# Behind a TLS-intercepting proxy, pip needs the proxy's CA: mount the host's bundle for the
# build and name it (podman build -v /etc/ssl/certs:/host-certs:ro --build-arg
# PIP_CERT=/host-certs/ca-certificates.crt); unset, pip uses the image's own CAs.
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# What dwave needs at run time and to build Horovod: Python, a compiler, cmake, Open MPI.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ make cmake \
      openmpi-bin libopenmpi-dev libsndfile1 ca-certificates procps \
 && if [ "$FLAVOUR" = gpu ]; then \
      apt-get install -y --no-install-recommends wget gnupg \
      && wget -q "$CUDA_REPO/cuda-keyring_1.1-1_all.deb" && dpkg -i cuda-keyring_1.1-1_all.deb \
      && rm cuda-keyring_1.1-1_all.deb && apt-get update \
      && apt-get install -y --no-install-recommends "cuda-nvcc-$CUDA_VERSION" \
           "cuda-cudart-dev-$CUDA_VERSION" libnccl2 libnccl-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/local/cuda/bin:/opt/dwave/bin:$PATH

# The locked dependencies first (a layer that changes only with the lock), then dwave itself.
COPY requirements/${FLAVOUR}.txt /src/requirements/
RUN python3 -m venv /opt/dwave \
 && /opt/dwave/bin/pip install -q --no-cache-dir --require-hashes -r "/src/requirements/$FLAVOUR.txt"
COPY scripts/install-horovod.sh /src/scripts/
RUN bash /src/scripts/install-horovod.sh /opt/dwave/bin/python "$FLAVOUR"
COPY . /src/dwave
RUN /opt/dwave/bin/pip install -q --no-cache-dir --no-deps /src/dwave && rm -rf /src

# The fused kernels, built once here for MARCH and found there at run time (a read-only image
# such as an Apptainer SIF never needs to write them).
ENV DWAVE_CACHE=/opt/dwave/cache DWAVE_MARCH=${MARCH}
RUN python -c "from dwave import fused_ops; assert fused_ops.load() is not None" 2>&1 \
      | grep -v '^20..-' || true; ls /opt/dwave/cache/ops/*/fused_ops.so
# mpirun as root inside the container (the usual case under docker/podman) is allowed.
ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
CMD ["dwave", "--help"]
