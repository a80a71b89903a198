/* The fluxq command: dispatch to subcommands. */
#include "cli/cli.h"

#include <string.h>

static void usage(FILE *f) {
    fprintf(f,
            "fluxq %s - FLUX inference with bitsandbytes-compatible 4-bit weights\n"
            "\n"
            "usage: fluxq <command> [options]   (fluxq <command> --help for details)\n"
            "\n"
            "commands:\n"
            "  demo         quantize a generated checkpoint, move it across every device,\n"
            "               dequantize it and report the error (no download needed)\n"
            "  quantize     IN OUT: quantize a safetensors file or diffusers folder to NF4/FP4\n"
            "  dequantize   IN OUT: turn a bitsandbytes 4-bit checkpoint back into floats\n"
            "  inspect      PATH: list tensors, quantization states, totals and problems\n"
            "  forward      one FLUX transformer forward from a safetensors of inputs\n"
            "  audit        list every buffer of a loaded model with its device\n"
            "  bench        quant|linear|flux: benchmarks against a copy / cuBLAS baseline\n"
            "  devices      list the devices fluxq can use\n"
            "  version      print the version\n"
            "\n"
            "exit status: 0 success, 1 error, 2 usage error\n",
            FQ_VERSION_STRING);
}

static int cmd_devices(void) {
    printf("cpu\n");
    int n = fq_cuda_device_count();
    for (int i = 0; i < n; i++) printf("cuda:%d\n", i);
    if (!fq_has_cuda()) printf("(built without CUDA)\n");
    return EXIT_OK;
}

int main(int argc, char **argv) {
    if (argc < 2) { usage(stderr); return EXIT_USAGE; }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) { usage(stdout); return EXIT_OK; }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) { printf("fluxq %s\n", FQ_VERSION_STRING); return EXIT_OK; }
    if (!strcmp(cmd, "devices")) return cmd_devices();
    if (!strcmp(cmd, "quantize")) return cmd_quantize(argc - 1, argv + 1);
    if (!strcmp(cmd, "dequantize")) return cmd_dequantize(argc - 1, argv + 1);
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "demo")) return cmd_demo(argc - 1, argv + 1);
    if (!strcmp(cmd, "forward")) return cmd_forward(argc - 1, argv + 1);
    if (!strcmp(cmd, "audit")) return cmd_audit(argc - 1, argv + 1);
    fprintf(stderr, "fluxq: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return EXIT_USAGE;
}
