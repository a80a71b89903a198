# fluxq build: `make` builds libfluxq (static + shared), the fluxq command, the
# tests and the benchmarks. The CUDA backend is compiled whenever nvcc is found.
#   make test            run the test suite
#   make SAN=1 test      the same under AddressSanitizer + UBSan (build-san/)
#   make CUDA=0          force a CPU-only build
#   make CUDA_ARCHS="90" choose the real architectures (default 80 86 89 90)
#   make CUDNN=0         CUDA without cuDNN (found by its header otherwise)

SAN        ?= 0
BUILD      ?= $(if $(filter 1,$(SAN)),build-san,build)
CC         ?= cc
CUDA_HOME  ?= /usr/local/cuda
NVCC       ?= $(shell command -v nvcc 2>/dev/null || (test -x $(CUDA_HOME)/bin/nvcc && echo $(CUDA_HOME)/bin/nvcc))
CUDA       ?= $(if $(NVCC),1,0)
CUDA_ARCHS ?= 80 86 89 90

# -Wno-format-truncation: snprintf truncation is defined behaviour, and gcc reports it
# differently at each -O level (the sanitizer build is -O1).
WARN     := -Wall -Wextra -Werror -Wno-format-truncation
CFLAGS   := -std=c11 -D_GNU_SOURCE -O2 -g -fPIC -pthread $(WARN) -Iinclude -Isrc
LDLIBS   := -lcjson -lopenblas -lm -lpthread
# Extra include/library directories for machines where a dependency is unpacked
# by hand (scripts/gpu-run.sh): make EXTRA_CFLAGS=-I... EXTRA_LDFLAGS=-L...
CFLAGS   += $(EXTRA_CFLAGS)
LDFLAGS  += $(EXTRA_LDFLAGS)
ifeq ($(SAN),1)
  SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
  CFLAGS   += $(SANFLAGS) -O1
  LDFLAGS  += $(SANFLAGS)
endif

LIB_C := $(wildcard src/core/*.c src/formats/*.c src/kernels/cpu/*.c src/ops/*.c src/io/*.c src/models/*.c)
LIB_S := $(wildcard src/kernels/cpu/*.S)
LIB_CU :=
ifeq ($(CUDA),1)
  LIB_CU  := $(wildcard src/kernels/cuda/*.cu)
  CFLAGS  += -DFQ_HAVE_CUDA -I$(CUDA_HOME)/include
  NVFLAGS := -std=c++17 -O3 -g -lineinfo -DFQ_HAVE_CUDA -Iinclude -Isrc \
             -Xcompiler -fPIC,-Wall,-Wextra -Werror all-warnings \
             $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
             --expt-relaxed-constexpr
  LDLIBS  += -L$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart_static -ldl -lrt -Wl,-rpath,$(CUDA_HOME)/lib64
  # nvcc's kernel launch stubs use guarded statics and EH personality (libstdc++).
  LDLIBS  += -lstdc++
  # WS_PROBES=1: gemm4_ws with its bench-only probes (FQ_WS_PROBE, docs/linear-cuda.md);
  # without it the kernel's loops carry no test of the probe flag (2-9 % faster).
  ifeq ($(WS_PROBES),1)
    NVFLAGS += -DFQ_WS_PROBES
  endif
  # cuDNN (fused attention, src/ops/attn_cudnn.c) whenever its header is found;
  # CUDNN=0 builds without it (our attention kernel only).
  CUDNN ?= $(if $(wildcard $(CUDA_HOME)/include/cudnn.h /usr/include/cudnn.h /usr/include/*-linux-gnu/cudnn.h),1,0)
  ifeq ($(CUDNN),1)
    CFLAGS += -DFQ_HAVE_CUDNN
    LDLIBS += -lcudnn
  endif
endif

OBJ := $(LIB_C:%.c=$(BUILD)/%.o) $(LIB_S:%.S=$(BUILD)/%.o) $(LIB_CU:%.cu=$(BUILD)/%.o)
# Benchmarks are linked into the fluxq command (`fluxq bench ...`) and also built
# as standalone programs (compiled again with -DFQ_BENCH_MAIN, which adds main()).
BENCH_C := $(wildcard bench/bench_*.c)
CLI_C   := $(wildcard src/cli/*.c) $(BENCH_C)
CLI_OBJ := $(CLI_C:%.c=$(BUILD)/%.o)
TESTS   := $(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard tests/test_*.c))
TEST_SUPPORT := $(patsubst %.c,$(BUILD)/%.o,$(wildcard tests/support/*.c))
BENCHES := $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_C))

all: $(BUILD)/libfluxq.a $(BUILD)/libfluxq.so $(BUILD)/fluxq $(TESTS) $(BENCHES)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

# The H100's measured rcp.approx table (see data/README.md), linked in with .incbin.
$(BUILD)/rcp_approx_sm90.bin: data/rcp_approx_sm90.bin.xz
	@mkdir -p $(dir $@)
	xz -dc $< > $@.tmp && mv $@.tmp $@
$(BUILD)/%.o: %.S $(BUILD)/rcp_approx_sm90.bin
	@mkdir -p $(dir $@)
	$(CC) -DFQ_RCP_TABLE_FILE='"$(BUILD)/rcp_approx_sm90.bin"' -c $< -o $@

$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -MMD -MP -c $< -o $@

# Hopper warpgroup-MMA kernels (*_sm90.cu) need sm_90a: compiled for that target
# only, and only when 90 is among CUDA_ARCHS (otherwise they build as host stubs).
ifneq ($(filter 90,$(CUDA_ARCHS)),)
  NVFLAGS_SM90 := $(filter-out -gencode arch=compute_%,$(NVFLAGS)) \
                  -gencode arch=compute_90a,code=sm_90a -DFQ_BUILD_SM90A
else
  NVFLAGS_SM90 := $(NVFLAGS)
endif
$(BUILD)/%_sm90.o: %_sm90.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS_SM90) -MMD -MP -c $< -o $@

$(BUILD)/libfluxq.a: $(OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libfluxq.so: $(OBJ)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/fluxq: $(CLI_OBJ) $(BUILD)/libfluxq.a
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(BUILD)/libfluxq.a $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(TEST_SUPPORT) $(BUILD)/libfluxq.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests $(LDFLAGS) -o $@ $< $(TEST_SUPPORT) $(BUILD)/libfluxq.a $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libfluxq.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DFQ_BENCH_MAIN $(LDFLAGS) -o $@ $< $(BUILD)/libfluxq.a $(LDLIBS)

test: all
	BUILD=$(BUILD) FLUXQ=$(BUILD)/fluxq tests/run.sh $(TESTS)

clean:
	rm -rf build build-san

.PHONY: all test clean
-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
