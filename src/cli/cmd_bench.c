/* fluxq bench: the benchmark programs of bench/, linked into the command. */
#include "cli/cli.h"

#include <string.h>

int fq_bench_quant(int argc, char **argv);
int fq_bench_linear(int argc, char **argv);
int fq_bench_flux(int argc, char **argv);
int fq_bench_linear_cpu(int argc, char **argv);
int fq_bench_gemm_group(int argc, char **argv);

static const char *HELP =
    "usage: fluxq bench quant  [--device DEV] [--iters N] [--json FILE] [--quick]\n"
    "       fluxq bench linear [--device DEV] [--iters N] [--json FILE] [--m 1,16,...]\n"
    "       fluxq bench linear-cpu [--threads N] [--seconds S] [--quick]\n"
    "       fluxq bench flux   --config dev|schnell|PATH --random-weights [--quantize nf4]\n"
    "                          [--double-quant] [--width 1024 --height 1024] [--device DEV]\n"
    "       fluxq bench gemm-group [--device DEV] [--iters N] [--reps N] [--shapes MxNxKxG,...]\n"
    "\n"
    "quant:  quantize/dequantize (NF4, blocksize 64, bf16, with and without double\n"
    "        quant) at the FLUX.1 weight shapes on every device, against a copy of\n"
    "        the same bytes measured in the same run.\n"
    "linear: 4-bit linear layers at the FLUX.1 shapes; on a GPU against cuBLASLt bf16\n"
    "        and dequantize + cuBLASLt, on the CPU against memory bandwidth.\n"
    "gemm-group: G same-input bf16 GEMMs (FLUX's q, k, v) as separate cuBLASLt calls,\n"
    "        one strided-batched call and one wide GEMM, interleaved in one run.\n"
    "Each benchmark also exists as a program: build/bench/bench_<name> --help.\n";

int cmd_bench(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(HELP, argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    if (!strcmp(argv[1], "quant")) return fq_bench_quant(argc - 1, argv + 1);
    if (!strcmp(argv[1], "linear")) return fq_bench_linear(argc - 1, argv + 1);
    if (!strcmp(argv[1], "flux")) return fq_bench_flux(argc - 1, argv + 1);
    if (!strcmp(argv[1], "linear-cpu")) return fq_bench_linear_cpu(argc - 1, argv + 1);
    if (!strcmp(argv[1], "gemm-group")) return fq_bench_gemm_group(argc - 1, argv + 1);
    return cli_usage_error("bench", "unknown benchmark '%s' (quant, linear, linear-cpu, flux or gemm-group)",
                           argv[1]);
}
